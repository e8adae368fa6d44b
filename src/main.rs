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
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
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
