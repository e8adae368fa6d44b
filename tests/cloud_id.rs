//! Cloud identities for Akeyless auth, against loopback fakes of IMDS (AWS, Azure) and the GCP
//! metadata server. The AWS cloud-id's SigV4 signature is verified twice, independently of the
//! signer in src/ (`aws-sigv4`): by an implementation written here and by botocore, the signer of
//! the official AWS SDK for Python. The AWS credentials chain itself is tested end to end in
//! tests/aws_credentials.rs.
#![cfg(feature = "akeyless")]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use kms_plugin::backend::akeyless::cloud_id::{
    aws_iam_cloud_id, aws_iam_cloud_id_at, aws_iam_cloud_id_from_chain, azure_ad_cloud_id,
    detect_cloud, gcp_cloud_id, AwsCredentialSource, Cloud, CloudIdError, Credentials,
    DetectConfig,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::http_fake::{closed_url, form_param, start, Resp};

fn creds(id: &str, secret: &str, token: Option<&str>) -> Credentials {
    Credentials::new(id, secret, token.map(str::to_string), None, "test")
}

/// botocore's signature, signed headers and scope for the request a cloud-id describes, or None
/// when the runner opted out of Python tests.
fn botocore_signature(cloud_id: &str, access_key: &str, secret: &str) -> Option<Value> {
    use std::io::Write;
    let Some(py) = support::akeyless_fake::python() else {
        assert!(
            support::external::opted_out("botocore"),
            "botocore check needs Python: set KMS_TEST_PYTHON (make deps) or KMS_TEST_OPT_OUT=botocore"
        );
        return None;
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/botocore_sigv4.py");
    let mut child = std::process::Command::new(py)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input =
        serde_json::json!({ "cloud_id": cloud_id, "access_key": access_key, "secret_key": secret });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "botocore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn b64s(v: &Value) -> String {
    String::from_utf8(B64.decode(v.as_str().unwrap()).unwrap()).unwrap()
}

fn hmac(key: &[u8], msg: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(msg.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// Recomputes the SigV4 signature of a decoded cloud-id the way STS would, and returns
/// (expected, claimed) signatures.
fn verify_cloud_id(
    cloud_id: &str,
    secret: &str,
) -> (String, String, BTreeMap<String, Vec<String>>) {
    let doc: Value = serde_json::from_slice(&B64.decode(cloud_id).unwrap()).unwrap();
    assert_eq!(doc["sts_request_method"], "POST");
    let url = b64s(&doc["sts_request_url"]);
    let body = b64s(&doc["sts_request_body"]);
    assert_eq!(body, "Action=GetCallerIdentity&Version=2011-06-15");
    let headers: BTreeMap<String, Vec<String>> =
        serde_json::from_str(&b64s(&doc["sts_request_headers"])).unwrap();
    let auth = &headers["Authorization"][0];
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 Credential=").unwrap();
    let (cred, rest) = rest.split_once(", SignedHeaders=").unwrap();
    let (signed, claimed) = rest.split_once(", Signature=").unwrap();
    let scope: Vec<&str> = cred.split('/').collect(); // AKID/date/region/service/aws4_request
    assert_eq!((scope[3], scope[4]), ("sts", "aws4_request"));
    let host = url
        .split("://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let lower: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.join(",")))
        .chain([("host".to_string(), host)])
        .collect();
    let canonical_headers: String = signed
        .split(';')
        .map(|h| {
            format!(
                "{h}:{}\n",
                lower
                    .get(h)
                    .unwrap_or_else(|| panic!("signed header {h} missing"))
            )
        })
        .collect();
    let path = url
        .split("://")
        .nth(1)
        .unwrap()
        .find('/')
        .map(|i| &url.split("://").nth(1).unwrap()[i..])
        .unwrap_or("/");
    let creq = format!(
        "POST\n{path}\n\n{canonical_headers}\n{signed}\n{}",
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    let amz_date = &headers["X-Amz-Date"][0];
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{}/{}/{}/aws4_request\n{}",
        scope[1],
        scope[2],
        scope[3],
        hex::encode(Sha256::digest(creq.as_bytes()))
    );
    let k = hmac(format!("AWS4{secret}").as_bytes(), scope[1]);
    let k = hmac(&k, scope[2]);
    let k = hmac(&k, scope[3]);
    let k = hmac(&k, "aws4_request");
    (hex::encode(hmac(&k, &sts)), claimed.to_string(), headers)
}

#[test]
fn aws_cloud_id_is_signed_correctly() {
    let example = creds(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        Some("SESSION-TOKEN"),
    );
    let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
    let id = aws_iam_cloud_id_at(&example, "https://sts.amazonaws.com/", "us-east-1", t).unwrap();
    let (expected, claimed, headers) =
        verify_cloud_id(&id, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
    assert_eq!(expected, claimed);
    assert_eq!(headers["X-Amz-Date"], ["20150830T123600Z"]);
    assert_eq!(headers["X-Amz-Security-Token"], ["SESSION-TOKEN"]);
    assert_eq!(
        headers["Content-Type"],
        ["application/x-www-form-urlencoded; charset=utf-8"]
    );
    assert_eq!(headers["Content-Length"], ["43"]);
    assert!(headers["Authorization"][0]
        .contains("Credential=AKIDEXAMPLE/20150830/us-east-1/sts/aws4_request, SignedHeaders=content-length;content-type;host;x-amz-date;x-amz-security-token,"));
    assert!(!String::from_utf8(B64.decode(&*id).unwrap())
        .unwrap()
        .contains("wJalrXUtnFEMI"));

    // A wrong secret does not verify; static keys carry no token header; regional endpoints work.
    let (wrong, claimed, _) = verify_cloud_id(&id, "another-secret");
    assert_ne!(wrong, claimed);
    let fixed = creds("AKIDSTATIC", "s3cr3t", None);
    let id = aws_iam_cloud_id_at(
        &fixed,
        "https://sts.eu-west-1.amazonaws.com/",
        "eu-west-1",
        t,
    )
    .unwrap();
    let (expected, claimed, headers) = verify_cloud_id(&id, "s3cr3t");
    assert_eq!(expected, claimed);
    assert!(!headers.contains_key("X-Amz-Security-Token"));
    assert!(headers["Authorization"][0].contains("/eu-west-1/sts/"));
}

/// botocore agrees with the signature for every partition's STS endpoint, with and without a
/// session token, and the structure matches what the official cloud-id helpers produce.
#[test]
fn botocore_recomputes_the_cloud_id_signature() {
    let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let cases = [
        ("https://sts.amazonaws.com/", "us-east-1", Some("tok/en+==")),
        ("https://sts.eu-west-1.amazonaws.com/", "eu-west-1", None),
        (
            "https://sts.cn-north-1.amazonaws.com.cn/",
            "cn-north-1",
            Some("cn-token"),
        ),
        (
            "https://sts.us-gov-west-1.amazonaws.com/",
            "us-gov-west-1",
            None,
        ),
    ];
    for (url, region, token) in cases {
        assert_eq!(
            kms_plugin::backend::akeyless::cloud_id::sts_url_for_region(
                (region != "us-east-1").then_some(region)
            ),
            url
        );
        let c = creds("AKIDBOTO", "boto/secret+key", token);
        let id = aws_iam_cloud_id_at(&c, url, region, t).unwrap();
        let (mine, claimed, headers) = verify_cloud_id(&id, "boto/secret+key");
        assert_eq!(mine, claimed, "{url}");
        let Some(boto) = botocore_signature(&id, "AKIDBOTO", "boto/secret+key") else {
            return;
        };
        assert_eq!(boto["signature"], claimed.as_str(), "{url}");
        let signed = match token {
            Some(_) => "content-length;content-type;host;x-amz-date;x-amz-security-token",
            None => "content-length;content-type;host;x-amz-date",
        };
        assert_eq!(boto["signed_headers"], signed);
        assert!(headers["Authorization"][0].contains(&format!("SignedHeaders={signed},")));
        assert_eq!(
            boto["credential_scope"],
            format!("20231114/{region}/sts/aws4_request")
        );
        let keys: Vec<&str> = headers.keys().map(String::as_str).collect();
        let mut want = vec![
            "Authorization",
            "Content-Length",
            "Content-Type",
            "X-Amz-Date",
        ];
        if token.is_some() {
            want.push("X-Amz-Security-Token");
        }
        assert_eq!(keys, want);
    }
}

/// The credential source serves from memory while the credentials are good, and resolves again
/// once they are (nearly) expired.
#[tokio::test]
async fn credential_source_caches_until_near_expiry() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    #[derive(Debug)]
    struct Counting(Arc<AtomicUsize>, Duration);
    impl aws_credential_types::provider::ProvideCredentials for Counting {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            let c = Credentials::new(
                format!("ASIA{n}"),
                "s",
                Some("t".into()),
                Some(SystemTime::now() + self.1),
                "counting",
            );
            aws_credential_types::provider::future::ProvideCredentials::ready(Ok(c))
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let long = AwsCredentialSource::new(Counting(calls.clone(), Duration::from_secs(3600)));
    for _ in 0..3 {
        let id = aws_iam_cloud_id_from_chain(&long, "https://sts.amazonaws.com/", "us-east-1")
            .await
            .unwrap();
        let (expected, claimed, headers) = verify_cloud_id(&id, "s");
        assert_eq!(expected, claimed);
        assert!(headers["Authorization"][0].contains("Credential=ASIA0/"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Already expired when handed out: resolved on every use.
    let calls = Arc::new(AtomicUsize::new(0));
    let short = AwsCredentialSource::new(Counting(calls.clone(), Duration::ZERO));
    for _ in 0..2 {
        short.credentials().await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn azure_and_gcp_cloud_ids() {
    let azure = start(|req| {
        let ok = req.path == "/metadata/identity/oauth2/token"
            && req.header("metadata") == Some("true")
            && req.query_param("resource").as_deref() == Some("https://management.azure.com/")
            && req.query_param("api-version").is_some();
        match (ok, req.query_param("object_id")) {
            (true, Some(id)) if id == "obj-1" => Resp::new(
                200,
                r#"{"access_token":"azure-token-obj1","token_type":"Bearer"}"#,
            ),
            (true, None) => Resp::new(200, r#"{"access_token":"azure-token","expires_in":"3599"}"#),
            _ => Resp::new(400, r#"{"error":"invalid_request"}"#),
        }
    })
    .await;
    assert_eq!(
        B64.decode(&*azure_ad_cloud_id(&azure.url, None).await.unwrap())
            .unwrap(),
        b"azure-token"
    );
    assert_eq!(
        B64.decode(&*azure_ad_cloud_id(&azure.url, Some("obj-1")).await.unwrap())
            .unwrap(),
        b"azure-token-obj1"
    );
    let err = azure_ad_cloud_id(&azure.url, Some("other"))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudIdError::Metadata { .. }), "{err}");

    let gcp = start(|req| {
        if req.path == "/computeMetadata/v1/instance/service-accounts/default/identity"
            && req.header("metadata-flavor") == Some("Google")
        {
            let aud = req.query_param("audience").unwrap_or_default();
            Resp::new(200, format!("jwt-for-{aud}")).header("metadata-flavor", "Google")
        } else {
            Resp::new(403, "")
        }
    })
    .await;
    assert_eq!(
        B64.decode(&*gcp_cloud_id(&gcp.url, None).await.unwrap())
            .unwrap(),
        b"jwt-for-akeyless.io"
    );
    assert_eq!(
        B64.decode(&*gcp_cloud_id(&gcp.url, Some("custom")).await.unwrap())
            .unwrap(),
        b"jwt-for-custom"
    );
    assert_eq!(
        gcp.requests()[0].query_param("format").as_deref(),
        Some("full")
    );

    let err = gcp_cloud_id(&closed_url(), None).await.unwrap_err();
    assert!(matches!(err, CloudIdError::Metadata { .. }), "{err}");
}

#[tokio::test]
async fn detects_the_cloud() {
    let aws = start(|req| match (req.method.as_str(), req.path.as_str()) {
        ("PUT", "/latest/api/token") => Resp::new(200, "t"),
        _ => Resp::new(404, ""),
    })
    .await;
    let gcp = start(|req| {
        if req.header("metadata-flavor") == Some("Google") {
            Resp::new(200, "instance/\n").header("Metadata-Flavor", "Google")
        } else {
            Resp::new(403, "")
        }
    })
    .await;
    // Something that answers 200 without the GCP marker header is not a GCP metadata server.
    let impostor = start(|_| Resp::new(200, "hello")).await;
    let azure = start(|req| {
        if req.path == "/metadata/instance" && req.header("metadata") == Some("true") {
            Resp::new(200, "{}")
        } else {
            Resp::new(400, "")
        }
    })
    .await;
    let cfg = |a: &str, g: &str, z: &str| DetectConfig {
        aws_imds_url: a.into(),
        gcp_metadata_url: g.into(),
        azure_imds_url: z.into(),
        timeout: Duration::from_millis(500),
    };
    let none = closed_url();
    assert_eq!(
        detect_cloud(&cfg(&aws.url, &none, &none)).await,
        Some(Cloud::Aws)
    );
    assert_eq!(
        detect_cloud(&cfg(&none, &gcp.url, &none)).await,
        Some(Cloud::Gcp)
    );
    assert_eq!(
        detect_cloud(&cfg(&none, &impostor.url, &azure.url)).await,
        Some(Cloud::Azure)
    );
    assert_eq!(Cloud::Azure.access_type(), "azure_ad");
    let started = Instant::now();
    assert_eq!(detect_cloud(&cfg(&none, &impostor.url, &none)).await, None);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn async_entry_point_signs_now() {
    let now = creds("AKIDNOW", "now-secret", None);
    let before = SystemTime::now();
    let id = aws_iam_cloud_id(&now, "https://sts.amazonaws.com/", "us-east-1")
        .await
        .unwrap();
    let (expected, claimed, headers) = verify_cloud_id(&id, "now-secret");
    assert_eq!(expected, claimed);
    let date = &headers["X-Amz-Date"][0];
    let year: u64 = date[..4].parse().unwrap();
    let now_year = 1970 + before.duration_since(UNIX_EPOCH).unwrap().as_secs() / 31_556_952;
    assert!(year.abs_diff(now_year) <= 1, "{date}");
}

#[tokio::test]
async fn azure_imds_is_retried_on_404_429_and_5xx_but_not_400() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let imds = start(move |_req| match c.fetch_add(1, Ordering::SeqCst) {
        0 => Resp::new(404, "identity not found"),
        1 => Resp::new(429, "slow down"),
        2 => Resp::new(503, ""),
        _ => Resp::new(200, r#"{"access_token":"azure-after-retries"}"#),
    })
    .await;
    let id = azure_ad_cloud_id(&imds.url, None).await.unwrap();
    assert_eq!(B64.decode(&*id).unwrap(), b"azure-after-retries");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);

    let bad = start(|_req| Resp::new(400, r#"{"error":"invalid_request"}"#)).await;
    assert!(azure_ad_cloud_id(&bad.url, None).await.is_err());
    assert_eq!(bad.requests().len(), 1, "400 is not retried");
}

#[tokio::test]
async fn azure_workload_identity_exchanges_the_federated_token() {
    use kms_plugin::backend::akeyless::cloud_id::{
        azure_workload_identity_cloud_id, AzureWorkloadIdentity,
    };
    let entra = start(|req| {
        let body = String::from_utf8_lossy(&req.body).to_string();
        let ok = req.method == "POST"
            && req.path == "/tenant-1/oauth2/v2.0/token"
            && form_param(&body, "client_id").as_deref() == Some("client-1")
            && form_param(&body, "grant_type").as_deref() == Some("client_credentials")
            && form_param(&body, "client_assertion").as_deref() == Some("projected-sa-jwt")
            && form_param(&body, "scope").as_deref()
                == Some("https://management.azure.com/.default");
        if ok {
            Resp::new(
                200,
                r#"{"access_token":"entra-token","token_type":"Bearer"}"#,
            )
        } else {
            Resp::new(400, r#"{"error":"invalid_client"}"#)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, "projected-sa-jwt\n").unwrap();
    let wi = AzureWorkloadIdentity {
        authority_host: format!("{}/", entra.url),
        tenant_id: "tenant-1".into(),
        client_id: "client-1".into(),
        token_file: file.clone(),
    };
    let id = azure_workload_identity_cloud_id(&wi).await.unwrap();
    assert_eq!(B64.decode(&*id).unwrap(), b"entra-token");
    // The file is re-read: a rotated token is what is sent next.
    std::fs::write(&file, "rotated").unwrap();
    let e = azure_workload_identity_cloud_id(&wi).await.unwrap_err();
    assert!(
        !e.to_string().contains("rotated"),
        "the assertion is never echoed: {e}"
    );
}
