//! A loopback reverse proxy in front of a real (or fake) key manager that can answer in its place,
//! the way an ingress default backend, a WAF, an egress proxy or a restarting gateway does: a bare
//! status with an HTML page or an empty body. Nothing it says is in the key manager's own error
//! shape, so none of it may ever count as a revocation.

use std::sync::{Arc, Mutex};

use super::http_fake::{read_request, write_response, Resp};

/// What the proxy answers instead of forwarding.
#[derive(Clone, Debug)]
pub struct ProxyAnswer {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub body: &'static str,
}

impl ProxyAnswer {
    pub fn html(status: u16) -> Self {
        ProxyAnswer {
            status,
            content_type: Some("text/html"),
            body: "<html><head><title>Not Found</title></head><body><h1>default backend - 404</h1><p>access denied by policy</p></body></html>",
        }
    }
    pub fn empty(status: u16) -> Self {
        ProxyAnswer {
            status,
            content_type: None,
            body: "",
        }
    }
}

/// A typed answer for requests whose body contains a needle: (needle, status, content type, body).
type TypedAnswer = (String, u16, &'static str, String);

/// (operation, access key id that signed it) of one forwarded request.
type Seen = (String, Option<String>);

#[derive(Clone)]
pub struct FaultProxy {
    pub url: String,
    answer: Arc<Mutex<Option<ProxyAnswer>>>,
    forwarded: Arc<Mutex<u64>>,
    /// Requests whose body contains the needle get this typed answer (status, content type, body):
    /// for behaviour of the real service that its stand-in lacks.
    typed: Arc<Mutex<Option<TypedAnswer>>>,
    /// Every request forwarded: (operation, access key id it was signed with).
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FaultProxy {
    /// From now on answer every request with `answer` (None: forward again).
    pub fn set(&self, answer: Option<ProxyAnswer>) {
        *self.answer.lock().unwrap() = answer;
    }
    pub fn forwarded(&self) -> u64 {
        *self.forwarded.lock().unwrap()
    }
    /// Answers requests whose body contains `needle` with `body` (in the service's own error shape).
    pub fn answer_typed(&self, needle: &str, status: u16, content_type: &'static str, body: &str) {
        *self.typed.lock().unwrap() = Some((needle.into(), status, content_type, body.into()));
    }
    pub fn clear_typed(&self) {
        *self.typed.lock().unwrap() = None;
    }
    /// The forwarded requests as (operation, signing access key id): the operation is the JSON
    /// API's `x-amz-target` (`TrentService.Decrypt`) or the query API's `Action` (`AssumeRole`).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// (operation, access key id) of a signed AWS request.
fn operation_and_signer(req: &super::http_fake::Req) -> Seen {
    let op = req
        .header("x-amz-target")
        .map(str::to_string)
        .unwrap_or_else(|| {
            super::http_fake::form_param(&String::from_utf8_lossy(&req.body), "Action")
                .unwrap_or_default()
        });
    let akid = req.header("authorization").and_then(|a| {
        let rest = a.split("Credential=").nth(1)?;
        Some(rest.split('/').next()?.to_string())
    });
    (op, akid)
}

/// Starts a proxy forwarding to `upstream` (an `http://` base URL).
pub async fn start(upstream: &str) -> FaultProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = FaultProxy {
        url: format!("http://{}", listener.local_addr().unwrap()),
        answer: Arc::new(Mutex::new(None)),
        forwarded: Arc::new(Mutex::new(0)),
        typed: Arc::new(Mutex::new(None)),
        seen: Arc::default(),
    };
    let upstream = upstream.trim_end_matches('/').to_string();
    let client = reqwest::Client::new();
    let p = proxy.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (p, client, upstream) = (p.clone(), client.clone(), upstream.clone());
            tokio::spawn(async move {
                let Some(req) = read_request(&mut sock).await else {
                    return;
                };
                let typed = p.typed.lock().unwrap().clone().filter(|(needle, ..)| {
                    String::from_utf8_lossy(&req.body).contains(needle.as_str())
                });
                let canned = p.answer.lock().unwrap().clone();
                let resp = match (canned, typed) {
                    (None, Some((_, status, ct, body))) => {
                        Resp::new(status, body).header("content-type", ct)
                    }
                    (canned, _) => match canned {
                        Some(a) => {
                            let r = Resp::new(a.status, a.body);
                            match a.content_type {
                                Some(ct) => r.header("content-type", ct),
                                None => r,
                            }
                        }
                        None => {
                            *p.forwarded.lock().unwrap() += 1;
                            p.seen.lock().unwrap().push(operation_and_signer(&req));
                            let target = if req.query.is_empty() {
                                format!("{upstream}{}", req.path)
                            } else {
                                format!("{upstream}{}?{}", req.path, req.query)
                            };
                            let method =
                                reqwest::Method::from_bytes(req.method.as_bytes()).unwrap();
                            let mut fwd = client.request(method, target).body(req.body.clone());
                            for (k, v) in &req.headers {
                                if !matches!(k.as_str(), "host" | "content-length" | "connection") {
                                    fwd = fwd.header(k, v);
                                }
                            }
                            match fwd.send().await {
                                Ok(up) => {
                                    let status = up.status().as_u16();
                                    let headers: Vec<(String, String)> = up
                                        .headers()
                                        .iter()
                                        .filter(|(k, _)| {
                                            !matches!(
                                                k.as_str(),
                                                "content-length"
                                                    | "connection"
                                                    | "transfer-encoding"
                                            )
                                        })
                                        .map(|(k, v)| {
                                            (k.to_string(), v.to_str().unwrap_or("").to_string())
                                        })
                                        .collect();
                                    let body = up.bytes().await.unwrap_or_default().to_vec();
                                    let mut r = Resp::new(status, body);
                                    r.headers = headers;
                                    r
                                }
                                Err(_) => Resp::new(502, "bad gateway"),
                            }
                        }
                    },
                };
                write_response(&mut sock, &resp).await;
            });
        }
    });
    proxy
}
