//! `kms-plugin inventory`: counts how every object of the checked resources is stored in etcd.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::ClientArgs;
use crate::backend::tls::TlsOptions;
use crate::inventory::etcd::{prefix_end, EtcdClient};
use crate::inventory::{Inventory, Requirement};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct InventoryArgs {
    /// etcd client URLs, comma-separated (e.g. https://127.0.0.1:2379). Only range reads are sent.
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd_endpoints: Vec<String>,
    /// CA bundle (PEM) of etcd's serving certificate.
    #[arg(long)]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's mutual TLS, e.g. the apiserver's etcd client certificate.
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// Key of --etcd-cert (PEM).
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// The apiserver's --etcd-prefix.
    #[arg(long, default_value = "/registry")]
    pub prefix: String,
    /// Resources to scan, comma-separated, as in the EncryptionConfiguration (core resources:
    /// `secrets`, `configmaps`; others as stored, e.g. `apps/deployments` is not a stored prefix).
    #[arg(long, value_delimiter = ',', default_value = "secrets")]
    pub resources: Vec<String>,
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
    /// Exit 3 unless every scanned object is KMS v2 under this key_id; `current` asks the plugin at
    /// --listen for its Status key_id. Plaintext, other providers and v1 objects never meet it.
    #[arg(long)]
    pub require_key_id: Option<String>,
    /// Exit 3 unless every scanned object is this plugin's ciphertext (v1 or v2) under this remote
    /// key reference (the `remote key` column).
    #[arg(long)]
    pub require_remote_key: Option<String>,
    /// Keys per range read: memory stays bounded by one page whatever the size of etcd.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub page_size: i64,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Exit code when a --require-* condition is not met.
pub const EXIT_REQUIREMENT_NOT_MET: i32 = 3;

pub async fn run(args: InventoryArgs) -> anyhow::Result<i32> {
    let mut requirements = Vec::new();
    if let Some(id) = &args.require_key_id {
        let id = if id == "current" {
            let status = super::client::status(&args.client).await?;
            anyhow::ensure!(
                !status.key_id.is_empty(),
                "the plugin at {} reports no key_id yet (healthz: {}); give the key_id explicitly",
                args.client.listen,
                status.healthz
            );
            status.key_id
        } else {
            id.clone()
        };
        requirements.push(Requirement::KeyId(id));
    }
    if let Some(r) = &args.require_remote_key {
        requirements.push(Requirement::RemoteKey(r.clone()));
    }
    let tls = TlsOptions {
        ca_file: args.etcd_cacert.clone(),
        client_cert_file: args.etcd_cert.clone(),
        client_key_file: args.etcd_key.clone(),
    };
    let etcd = EtcdClient::new(args.etcd_endpoints.clone(), &tls)?;
    let progress = std::io::stderr().is_terminal();
    let mut inv = Inventory::default();
    let prefix = args.prefix.trim_end_matches('/');
    for resource in &args.resources {
        let base = format!("{prefix}/{}/", resource.trim_matches('/'));
        let end = prefix_end(base.as_bytes());
        let mut start = base.as_bytes().to_vec();
        let mut scanned = 0u64;
        inv.resources.entry(resource.clone()).or_default();
        loop {
            let (page, more) = etcd.range(&start, &end, args.page_size).await?;
            for kv in &page {
                inv.add(resource, &kv.value);
            }
            scanned += page.len() as u64;
            if progress {
                eprint!("\r{resource}: {scanned} objects");
            }
            match page.last() {
                Some(last) if more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        if progress {
            eprintln!();
        }
    }
    match args.output {
        Output::Table => print!("{}", inv.table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&inv.json())?),
    }
    let mut failed = false;
    for req in &requirements {
        for (resource, bad) in inv.violations(req) {
            if bad > 0 {
                failed = true;
                eprintln!("{bad} {resource} not under {}", describe(req));
            }
        }
    }
    Ok(if failed { EXIT_REQUIREMENT_NOT_MET } else { 0 })
}

fn describe(req: &Requirement) -> String {
    match req {
        Requirement::KeyId(id) => format!("KMS v2 key_id {id}"),
        Requirement::RemoteKey(r) => format!("this plugin's remote key {r}"),
    }
}
