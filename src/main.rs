#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use kms_plugin::cli::{self, Cli, Command, LogFormat};

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("invalid --log-level {level:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(log_colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR"),
        ));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Colour codes only on a terminal (a file, pipe or journald gets plain text), and never with
/// NO_COLOR set to a non-empty value (no-color.org).
fn log_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Parses flags and environment, then layers the `--config` file under them.
fn parse() -> Cli {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cmd = Cli::command();
    let matches = cmd.clone().get_matches_from(&argv);
    if let Some(("serve", sub)) = matches.subcommand() {
        if let Some(path) = sub.get_one::<std::path::PathBuf>("config") {
            let serve_cmd = cmd.find_subcommand("serve").expect("serve subcommand");
            match kms_plugin::config::file_flags(serve_cmd, sub, path) {
                Ok(extra) if !extra.is_empty() => {
                    let mut all = argv.clone();
                    all.extend(extra);
                    let m = Cli::command().get_matches_from(all);
                    return Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit());
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            }
        }
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = parse();
    init_logging(cli.log_format, &cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => cli::serve::run(*args).await,
            Command::Keygen(args) => {
                let name = if args.add {
                    kms_plugin::backend::local::add_key(&args.file)?
                } else {
                    kms_plugin::backend::local::create_key_file(&args.file)?
                };
                eprintln!(
                    "{} key {name} in {}",
                    if args.add { "added primary" } else { "created" },
                    args.file.display()
                );
                Ok(0)
            }
            Command::Health(args) => cli::client::health(args).await,
            Command::Encrypt(args) => cli::client::encrypt(args).await,
            Command::Decrypt(args) => cli::client::decrypt(args).await,
            Command::RotateLocal(args) => cli::client::rotate_local(&args.client).await,
            #[cfg(feature = "inventory")]
            Command::Inventory(args) => cli::inventory::run(*args).await,
            #[cfg(feature = "inventory")]
            Command::Recover(args) => cli::recover::run(*args).await,
            #[cfg(feature = "akeyless")]
            Command::Akeyless(args) => cli::akeyless_uid::run(args).await,
            Command::Version => {
                println!("kms-plugin {}", env!("CARGO_PKG_VERSION"));
                println!("backends: {}", kms_plugin::compiled_backends().join(", "));
                Ok(0)
            }
            Command::ConfigReference => {
                let cmd = Cli::command();
                print!(
                    "{}",
                    kms_plugin::config::reference_markdown(
                        cmd.find_subcommand("serve").expect("serve")
                    )
                );
                Ok(0)
            }
        }
    });
    // A command has finished its own orderly shutdown (serve drains within --shutdown-timeout).
    // What may still run is a backend call stuck in a token or server that never answers: do not
    // wait for it, or a hung HSM would keep SIGTERM from ending the process.
    runtime.shutdown_timeout(cli::serve::EXIT_GRACE);
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(log_colour(true, Some("".into())));
        assert!(!log_colour(true, Some("1".into())));
        assert!(!log_colour(false, None));
    }
}
