//! `kms-plugin akeyless uid …`: Universal Identity tokens for a whole control plane, run on the
//! always-on generator machine that holds the parent token. One child token per node (may rotate
//! itself, may not make children), named by the node in its description so the commands can find it
//! again. Scriptable: `--output json`, and exit codes 0 done (or nothing to do), 1 failure (network,
//! server, local file), 2 usage, 3 the parent token was refused, 4 conflict or not found.
//!
//! The parent token comes from `--uid-token-file` (which `renew` rewrites) or the environment
//! variable `KMS_PLUGIN_AKEYLESS_UID_TOKEN`, never from a flag value; child tokens go to a 0600 file,
//! or to stdout only with `--stdout`. Neither is ever logged.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::backend::akeyless::client::{Budgets, Client};
use crate::backend::akeyless::config::DEFAULT_URL;
use crate::backend::akeyless::uid::{self, ChildSpec, TokenStore, UidNode};
use crate::backend::akeyless::Secret;
use crate::backend::BackendError;

const PARENT_ENV: &str = "KMS_PLUGIN_AKEYLESS_UID_TOKEN";
/// Description prefix that marks a child token as the token of a node.
const NODE_PREFIX: &str = "kms-plugin node ";

#[derive(Args, Debug)]
pub struct AkeylessArgs {
    #[command(subcommand)]
    pub command: AkeylessCommand,
}

#[derive(Subcommand, Debug)]
pub enum AkeylessCommand {
    /// Universal Identity child tokens for control-plane nodes (run on the generator machine).
    #[command(subcommand)]
    Uid(UidCommand),
}

#[derive(Subcommand, Debug)]
pub enum UidCommand {
    /// Create the child token of a node (idempotent: an existing one in --out is kept).
    CreateChild(CreateChildArgs),
    /// List the child tokens with TTL, expiry and last rotation.
    List(ListArgs),
    /// Revoke the child token of a node, one token by id, or every child.
    Revoke(RevokeArgs),
    /// Rotate the parent token (two-phase, saved back to its file) to keep it alive; for cron.
    Renew(RenewArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct Common {
    /// Akeyless API base URL (or gateway, e.g. https://gw:8000/api/v2); else env AKEYLESS_URL, else
    /// the public API.
    #[arg(long = "akeyless-url", alias = "url", env = "KMS_PLUGIN_AKEYLESS_URL")]
    pub url: Option<String>,
    /// File holding the parent (generator) UID token; else env KMS_PLUGIN_AKEYLESS_UID_TOKEN.
    #[arg(
        long = "uid-token-file",
        alias = "parent-token-file",
        alias = "akeyless-uid-token-file",
        env = "KMS_PLUGIN_AKEYLESS_UID_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// Time allowed for each Akeyless call, retries included.
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// PEM bundle of the CA that signs a private gateway's certificate (added to the system trust
    /// store, or to SSL_CERT_FILE/SSL_CERT_DIR when set).
    #[arg(long = "akeyless-ca-file", env = "KMS_PLUGIN_AKEYLESS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CreateChildArgs {
    #[command(flatten)]
    pub common: Common,
    /// Node name (letters, digits, `.`, `_`, `-`); stored in the token's description.
    #[arg(long)]
    pub node: String,
    /// Lifetime of the child token between rotations, e.g. 60m or 24h (a bare number is minutes,
    /// the API's unit; sent in whole minutes).
    #[arg(long, default_value = "60m", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Write the token to this file (mode 0600).
    #[arg(long, required_unless_present = "stdout", conflicts_with = "stdout")]
    pub out: Option<PathBuf>,
    /// Print the token on stdout instead of writing a file.
    #[arg(long)]
    pub stdout: bool,
    /// Revoke the node's existing child token and issue a new one.
    #[arg(long)]
    pub replace: bool,
    /// Let the child create children of its own (off: a node never needs to).
    #[arg(long)]
    pub allow_children: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct RevokeTarget {
    /// The node whose child token(s) to revoke.
    #[arg(long)]
    pub node: Option<String>,
    /// One token id (as `list` shows it).
    #[arg(long)]
    pub token_id: Option<String>,
    /// Every child token of the parent (the parent itself stays).
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub target: RevokeTarget,
}

#[derive(Args, Debug)]
pub struct RenewArgs {
    #[command(flatten)]
    pub common: Common,
    /// Rotate only when less than this is left (e.g. run every 10m with --if-expires-within 30m).
    #[arg(long, value_parser = super::parse_duration)]
    pub if_expires_within: Option<Duration>,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("the TTL must be at least 1 minute".into()),
        Ok(minutes) => Ok(Duration::from_secs(minutes.saturating_mul(60))),
        Err(_) => super::parse_duration(s),
    }
}

/// A failed command: exit code and message (never a token).
struct Failure(u8, String);

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        let code = match e {
            BackendError::Authentication(_) => 3,
            BackendError::Config(_) => 2,
            _ => 1,
        };
        Failure(code, e.to_string())
    }
}

pub async fn run(args: AkeylessArgs) -> anyhow::Result<i32> {
    let AkeylessCommand::Uid(cmd) = args.command;
    let output = match &cmd {
        UidCommand::CreateChild(a) => a.common.output,
        UidCommand::List(a) => a.common.output,
        UidCommand::Revoke(a) => a.common.output,
        UidCommand::Renew(a) => a.common.output,
    };
    let result = match cmd {
        UidCommand::CreateChild(a) => create_child(a).await,
        UidCommand::List(a) => list(a).await,
        UidCommand::Revoke(a) => revoke(a).await,
        UidCommand::Renew(a) => renew(a).await,
    };
    match result {
        Ok((value, text)) => {
            match output {
                Output::Json => println!("{value}"),
                Output::Text => println!("{text}"),
            }
            Ok(0)
        }
        Err(Failure(code, msg)) => {
            if output == Output::Json {
                println!("{}", json!({ "error": msg, "exit_code": code }));
            }
            eprintln!("error: {msg}");
            Ok(code as i32)
        }
    }
}

type Answer = Result<(Value, String), Failure>;

struct Session {
    client: Client,
    parent: Secret,
    store: Option<TokenStore>,
    timeout: Duration,
}

impl Session {
    fn open(c: &Common) -> Result<Session, Failure> {
        let url = c
            .url
            .clone()
            .or_else(|| {
                std::env::var("AKEYLESS_URL")
                    .ok()
                    .filter(|u| !u.trim().is_empty())
            })
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        let tls = crate::backend::tls::TlsOptions {
            ca_file: c.ca_file.clone(),
            ..Default::default()
        };
        let budgets = Budgets {
            request: c.timeout,
            login: c.timeout,
        };
        let client = Client::new(&url, budgets, &tls)?;
        let (parent, store) = match &c.token_file {
            Some(path) => {
                let store = TokenStore::new(path);
                let parent = store.load().ok_or_else(|| {
                    Failure(
                        1,
                        format!(
                            "no parent token in {} (missing, empty or unreadable); put the generator's \
                             UID token there (mode 0600)",
                            path.display()
                        ),
                    )
                })?;
                (parent, Some(store))
            }
            None => match std::env::var(PARENT_ENV) {
                Ok(t) if !t.trim().is_empty() => (Secret::new(t.trim()), None),
                _ => {
                    return Err(Failure(
                        2,
                        format!("the parent token is needed: pass --uid-token-file FILE or set {PARENT_ENV}"),
                    ))
                }
            },
        };
        Ok(Session {
            client,
            parent,
            store,
            timeout: c.timeout,
        })
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// A rotation of the parent interrupted before its ack: finish it, so the file holds the token
    /// the server considers current.
    async fn finish_interrupted(&self) {
        let Some(store) = &self.store else { return };
        let Some(old) = store.load_previous() else {
            return;
        };
        match uid::ack(&self.client, &old, &self.parent, self.deadline()).await {
            Ok(()) => store.acked(),
            // Refused: fine if the saved token works (the ack had landed, or was not needed).
            Err(e) if !e.is_transient() => {
                if self.tree().await.is_ok() {
                    store.acked();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot acknowledge an interrupted rotation of the parent token")
            }
        }
    }

    async fn tree(&self) -> Result<UidNode, Failure> {
        Ok(uid::list_children(&self.client, &self.parent, self.deadline()).await?)
    }
}

fn valid_node(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Failure(
            2,
            format!("--node {name:?}: use 1-63 letters, digits, '.', '_' or '-'"),
        ))
    }
}

fn node_of(n: &UidNode) -> Option<&str> {
    n.comment.strip_prefix(NODE_PREFIX)
}

fn state(n: &UidNode) -> &'static str {
    if n.revoked {
        "revoked"
    } else if n.seconds_left().is_some_and(|s| s <= 0) {
        "expired"
    } else {
        "active"
    }
}

fn describe(n: &UidNode) -> Value {
    json!({
        "id": n.id,
        "node": node_of(n),
        "comment": n.comment,
        "state": state(n),
        "ttl_minutes": n.ttl_minutes,
        "expired_date": n.expired_date,
        "seconds_left": n.seconds_left(),
        "last_rotate": n.last_rotate,
        "deny_rotate": n.deny_rotate,
        "deny_inheritance": n.deny_inheritance,
    })
}

async fn create_child(a: CreateChildArgs) -> Answer {
    valid_node(&a.node)?;
    let s = Session::open(&a.common)?;
    s.finish_interrupted().await;
    let comment = format!("{NODE_PREFIX}{}", a.node);
    let tree = s.tree().await?;
    let live: Vec<&UidNode> = tree
        .children
        .iter()
        .filter(|c| c.comment == comment && state(c) == "active")
        .collect();
    if !live.is_empty() && !a.replace {
        // Idempotent re-run: the file already holds this node's live token.
        if let Some(out) = &a.out {
            if let Some(held) = TokenStore::new(out).load() {
                if let Ok(me) = uid::list_children(&s.client, &held, s.deadline()).await {
                    if live.iter().any(|c| c.id == me.id) {
                        return Ok((
                            json!({"node": a.node, "token_id": me.id, "created": false, "file": out}),
                            format!(
                                "node {} already has child token {} in {}",
                                a.node,
                                me.id,
                                out.display()
                            ),
                        ));
                    }
                }
            }
        }
        let ids: Vec<&str> = live.iter().map(|c| c.id.as_str()).collect();
        return Err(Failure(
            4,
            format!(
                "node {} already has child token {} and --out does not hold it; pass --replace to \
                 revoke it and issue a new one",
                a.node,
                ids.join(", ")
            ),
        ));
    }
    let mut revoked = Vec::new();
    for c in &live {
        uid::revoke(&s.client, &s.parent, &c.id, true, s.deadline()).await?;
        revoked.push(c.id.clone());
    }
    let before: Vec<String> = tree.children.iter().map(|c| c.id.clone()).collect();
    let spec = ChildSpec {
        ttl: a.ttl,
        deny_rotate: false,
        deny_inheritance: !a.allow_children,
        description: comment.clone(),
    };
    let token = uid::create_child(&s.client, &s.parent, &spec, s.deadline()).await?;
    // The new token's id: ask with the token itself (its own node is the root of its tree).
    let id = match uid::list_children(&s.client, &token, s.deadline()).await {
        Ok(me) => me.id,
        Err(_) => s
            .tree()
            .await
            .ok()
            .and_then(|t| {
                t.children
                    .into_iter()
                    .find(|c| c.comment == comment && !before.contains(&c.id))
                    .map(|c| c.id)
            })
            .unwrap_or_default(),
    };
    let mut value = json!({
        "node": a.node,
        "token_id": id,
        "created": true,
        "ttl_minutes": uid::ttl_minutes(a.ttl),
        "replaced": revoked,
    });
    if let Some(out) = &a.out {
        if let Err(e) =
            crate::fsutil::write_atomic(out, format!("{}\n", token.expose()).as_bytes(), 0o600)
        {
            // Nobody can use a token that was not saved: take it back.
            let undo = uid::revoke(&s.client, &s.parent, &id, true, s.deadline()).await;
            return Err(Failure(
                1,
                format!(
                    "cannot write {}: {e}; the new child token {id} was {}",
                    out.display(),
                    if undo.is_ok() {
                        "revoked again"
                    } else {
                        "NOT revoked: revoke it with `kms-plugin akeyless uid revoke --token-id`"
                    }
                ),
            ));
        }
        value["file"] = json!(out);
        let text = format!(
            "created child token {id} for node {} in {} (mode 0600)",
            a.node,
            out.display()
        );
        return Ok((value, text));
    }
    // --stdout: the token is the output (text) or a field of it (json).
    value["token"] = json!(token.expose());
    Ok((value, token.expose().to_string()))
}

async fn list(a: ListArgs) -> Answer {
    let s = Session::open(&a.common)?;
    s.finish_interrupted().await;
    let tree = s.tree().await?;
    let mut text = format!(
        "parent {} expires in {}\n{:<14} {:<20} {:<8} {:>8} {:>12}  LAST ROTATION",
        tree.id,
        left_text(&tree),
        "ID",
        "NODE",
        "STATE",
        "TTL(min)",
        "EXPIRES IN",
    );
    for c in &tree.children {
        text.push_str(&format!(
            "\n{:<14} {:<20} {:<8} {:>8} {:>12}  {}",
            c.id,
            node_of(c).unwrap_or("-"),
            state(c),
            c.ttl_minutes.map_or("-".into(), |t| t.to_string()),
            left_text(c),
            if c.last_rotate.is_empty() {
                "never"
            } else {
                &c.last_rotate
            },
        ));
    }
    let value = json!({
        "parent": describe(&tree),
        "children": tree.children.iter().map(describe).collect::<Vec<_>>(),
    });
    Ok((value, text))
}

fn left_text(n: &UidNode) -> String {
    match n.seconds_left() {
        Some(s) if s <= 0 => "expired".into(),
        Some(s) => humantime::format_duration(Duration::from_secs(s as u64)).to_string(),
        None => "-".into(),
    }
}

async fn revoke(a: RevokeArgs) -> Answer {
    if let Some(n) = &a.target.node {
        valid_node(n)?;
    }
    let s = Session::open(&a.common)?;
    s.finish_interrupted().await;
    let tree = s.tree().await?;
    let targets: Vec<&UidNode> = if let Some(id) = &a.target.token_id {
        let found = tree.children.iter().find(|c| &c.id == id);
        match found {
            Some(c) => vec![c],
            None => {
                return Err(Failure(
                    4,
                    format!(
                        "no child token {id} under the parent (see `kms-plugin akeyless uid list`)"
                    ),
                ))
            }
        }
    } else if let Some(node) = &a.target.node {
        tree.children
            .iter()
            .filter(|c| node_of(c) == Some(node.as_str()))
            .collect()
    } else {
        tree.children.iter().collect()
    };
    let mut revoked = Vec::new();
    let mut already = Vec::new();
    for c in targets {
        if c.revoked {
            already.push(c.id.clone());
            continue;
        }
        uid::revoke(&s.client, &s.parent, &c.id, true, s.deadline()).await?;
        revoked.push(c.id.clone());
    }
    let text = if revoked.is_empty() {
        "nothing to revoke".to_string()
    } else {
        format!("revoked {}", revoked.join(", "))
    };
    Ok((
        json!({"revoked": revoked, "already_revoked": already}),
        text,
    ))
}

async fn renew(a: RenewArgs) -> Answer {
    let s = Session::open(&a.common)?;
    let Some(store) = s.store.clone() else {
        return Err(Failure(
            2,
            "renew writes the rotated parent token back: pass --uid-token-file".into(),
        ));
    };
    s.finish_interrupted().await;
    // The ack above may have changed nothing on disk, but re-read: the file is the truth.
    let parent = store.load().unwrap_or_else(|| s.parent.clone());
    if let Some(within) = a.if_expires_within {
        if let Ok(me) = uid::list_children(&s.client, &parent, s.deadline()).await {
            if let Some(left) = me.seconds_left().filter(|l| *l > within.as_secs() as i64) {
                return Ok((
                    json!({"rotated": false, "seconds_left": left}),
                    format!(
                        "parent token has {} left; not rotated",
                        humantime::format_duration(Duration::from_secs(left as u64))
                    ),
                ));
            }
        }
    }
    let (new, acked) = uid::rotate_two_phase(&s.client, Some(&store), &parent, s.deadline())
        .await
        .map_err(|e| {
            let mut f = Failure::from(e);
            if f.0 == 3 {
                f.1.push_str(
                    "; the parent token is expired, revoked or was replaced: generate a new one \
                     (`akeyless uid-generate-token`, which also drops every child) and write it to the file",
                );
            }
            f
        })?;
    let left = uid::list_children(&s.client, &new, s.deadline())
        .await
        .ok()
        .and_then(|me| me.seconds_left());
    Ok((
        json!({"rotated": true, "acknowledged": acked, "seconds_left": left, "file": store.path()}),
        format!(
            "rotated the parent token and saved it to {}{}",
            store.path().display(),
            if acked {
                ""
            } else {
                " (ack pending; the next run completes it)"
            }
        ),
    ))
}
