//! Config file parsing: arbitrary text as the `--config` YAML, then the resulting flags through clap,
//! exactly as `main` does. Errors are fine; panics are not.
#![no_main]

use std::sync::OnceLock;

use clap::CommandFactory;
use kms_plugin::cli::Cli;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static BASE: OnceLock<(clap::Command, clap::ArgMatches)> = OnceLock::new();
    let (cmd, matches) = BASE.get_or_init(|| {
        let cmd = Cli::command();
        let m = cmd
            .clone()
            .try_get_matches_from(["kms-plugin", "serve"])
            .expect("bare serve parses");
        let sub = m.subcommand_matches("serve").expect("serve").clone();
        (cmd, sub)
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let serve = cmd.find_subcommand("serve").expect("serve");
    if let Ok(extra) = kms_plugin::config::flags_from_yaml(serve, matches, text, "fuzz.yaml") {
        let mut argv: Vec<std::ffi::OsString> = vec!["kms-plugin".into(), "serve".into()];
        argv.extend(extra);
        let _ = Cli::command().try_get_matches_from(argv);
    }
});
