//! A small KMS client over the UNIX socket, for `health`, `encrypt` and `decrypt`.

use std::io::{Read, Write};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use super::{ApiChoice, ClientArgs, DecryptArgs, EncryptArgs, HealthArgs};
use crate::proto::{v1beta1, v2};
use crate::protocol::socket::ListenAddr;

/// Opens a gRPC channel to a plugin socket (path or abstract).
pub async fn connect(addr: &ListenAddr) -> anyhow::Result<Channel> {
    let addr = addr.clone();
    let channel = Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let addr = addr.clone();
            async move { connect_stream(&addr).await.map(TokioIo::new) }
        }))
        .await?;
    Ok(channel)
}

pub async fn connect_stream(addr: &ListenAddr) -> std::io::Result<tokio::net::UnixStream> {
    match addr {
        ListenAddr::Path(p) => tokio::net::UnixStream::connect(p).await,
        ListenAddr::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            let s = std::os::unix::net::UnixStream::connect_addr(&sa)?;
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        }
    }
}

async fn with_timeout<T>(
    args: &ClientArgs,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(args.timeout, fut)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {} within {:?}", args.listen, args.timeout))?
}

fn request<T>(msg: T, args: &ClientArgs) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(args.timeout);
    r
}

/// Exit code 0 when Status says ok, 1 otherwise.
/// The running plugin's Status.
pub async fn status(c: &ClientArgs) -> anyhow::Result<v2::StatusResponse> {
    with_timeout(c, async {
        let mut client = v2::key_management_service_client::KeyManagementServiceClient::new(
            connect(&c.listen).await?,
        );
        Ok(client
            .status(request(v2::StatusRequest {}, c))
            .await?
            .into_inner())
    })
    .await
}

/// `kms-plugin rotate-local`: asks the running plugin to retire its current local KEK.
pub async fn rotate_local(c: &ClientArgs) -> anyhow::Result<i32> {
    let reply = with_timeout(c, async {
        let mut client =
            crate::proto::admin::admin_client::AdminClient::new(connect(&c.listen).await?);
        Ok(client
            .retire_local_kek(request(crate::proto::admin::RetireLocalKekRequest {}, c))
            .await?
            .into_inner())
    })
    .await?;
    if reply.retired_kek.is_empty() {
        println!("no local KEK was in use; the next Encrypt creates one");
    } else {
        println!(
            "retired local KEK {}; the next Encrypt creates a new one (run a storage migration to move existing data)",
            reply.retired_kek
        );
    }
    Ok(0)
}

async fn escrow_health(
    c: &ClientArgs,
) -> Result<Vec<crate::proto::admin::EscrowBackendHealth>, tonic::Status> {
    let channel = connect(&c.listen)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut client = crate::proto::admin::admin_client::AdminClient::new(channel);
    let reply = client
        .escrow_health(request(crate::proto::admin::EscrowHealthRequest {}, c))
        .await?;
    Ok(reply.into_inner().escrow)
}

pub async fn health(args: HealthArgs) -> anyhow::Result<i32> {
    let status = status(&args.client).await?;
    if args.verbose {
        println!(
            "version: {}\nhealthz: {}\nkey_id: {}",
            status.version, status.healthz, status.key_id
        );
        // Escrow health is reported apart from Status: an escrow outage never makes the plugin unhealthy.
        match escrow_health(&args.client).await {
            Ok(list) => {
                for e in list {
                    if e.ok {
                        println!("escrow {}: ok", e.backend);
                    } else {
                        println!("escrow {}: {}", e.backend, e.error);
                    }
                }
            }
            // A plugin from before escrow existed.
            Err(e) if e.code() == tonic::Code::Unimplemented => {}
            Err(e) => println!("escrow: could not ask: {}", e.message()),
        }
    } else if status.healthz != "ok" {
        eprintln!("unhealthy: {}", status.healthz);
    }
    Ok(if status.healthz == "ok" { 0 } else { 1 })
}

pub async fn encrypt(args: EncryptArgs) -> anyhow::Result<i32> {
    let mut plaintext = Vec::new();
    std::io::stdin().read_to_end(&mut plaintext)?;
    let plaintext = zeroize::Zeroizing::new(plaintext);
    let c = &args.client;
    let (ciphertext, key_id) = with_timeout(c, async {
        let channel = connect(&c.listen).await?;
        Ok(match args.api {
            ApiChoice::V2 => {
                let r = v2::key_management_service_client::KeyManagementServiceClient::new(channel)
                    .encrypt(request(
                        v2::EncryptRequest {
                            plaintext: plaintext.to_vec(),
                            uid: "kms-plugin-cli".into(),
                        },
                        c,
                    ))
                    .await?
                    .into_inner();
                (r.ciphertext, r.key_id)
            }
            ApiChoice::V1 => {
                let r = v1beta1::key_management_service_client::KeyManagementServiceClient::new(
                    channel,
                )
                .encrypt(request(
                    v1beta1::EncryptRequest {
                        version: "v1beta1".into(),
                        plain: plaintext.to_vec(),
                    },
                    c,
                ))
                .await?
                .into_inner();
                (r.cipher, String::new())
            }
        })
    })
    .await?;
    println!(
        "{}",
        serde_json::json!({ "ciphertext": B64.encode(ciphertext), "key_id": key_id })
    );
    Ok(0)
}

pub async fn decrypt(args: DecryptArgs) -> anyhow::Result<i32> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let ciphertext = B64.decode(input.trim()).map_err(|e| {
        anyhow::anyhow!("stdin is not base64 (as printed by `kms-plugin encrypt`): {e}")
    })?;
    let c = &args.client;
    let plaintext = with_timeout(c, async {
        let channel = connect(&c.listen).await?;
        Ok(match args.api {
            ApiChoice::V2 => {
                v2::key_management_service_client::KeyManagementServiceClient::new(channel)
                    .decrypt(request(
                        v2::DecryptRequest {
                            ciphertext,
                            uid: "kms-plugin-cli".into(),
                            key_id: args.key_id.clone(),
                            annotations: Default::default(),
                        },
                        c,
                    ))
                    .await?
                    .into_inner()
                    .plaintext
            }
            ApiChoice::V1 => {
                v1beta1::key_management_service_client::KeyManagementServiceClient::new(channel)
                    .decrypt(request(
                        v1beta1::DecryptRequest {
                            version: "v1beta1".into(),
                            cipher: ciphertext,
                        },
                        c,
                    ))
                    .await?
                    .into_inner()
                    .plain
            }
        })
    })
    .await?;
    let plaintext = zeroize::Zeroizing::new(plaintext);
    std::io::stdout().write_all(&plaintext)?;
    Ok(0)
}
