//! Cloud identities for Akeyless auth and the AWS credentials chain, against loopback fakes of STS,
//! IMDS (AWS, Azure) and the GCP metadata server. The AWS cloud-id's SigV4 signature is verified by
//! an implementation written here, independent of the one in src/.
#![cfg(feature = "akeyless")]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use kms_plugin::backend::akeyless::cloud_id::{
    aws_iam_cloud_id, aws_iam_cloud_id_at, aws_iam_cloud_id_from_chain, azure_ad_cloud_id,
    detect_cloud, gcp_cloud_id, Cloud, CloudIdError, DetectConfig,
};
use kms_plugin::backend::aws::credentials::{
    ChainConfig, Credentials, CredentialsError, CredentialsProvider,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::http_fake::{closed_url, form_param, start, Resp};

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
    let creds = Credentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        Some("SESSION-TOKEN".into()),
    );
    let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
    let id = aws_iam_cloud_id_at(&creds, "https://sts.amazonaws.com/", "us-east-1", t).unwrap();
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
    let creds = Credentials::new("AKIDSTATIC", "s3cr3t", None);
    let id = aws_iam_cloud_id_at(
        &creds,
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

const STS_OK: &str =
    "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIAWEBID</AccessKeyId>\
<SecretAccessKey>web/secret+key</SecretAccessKey><SessionToken>web-session-token</SessionToken>\
<Expiration>2099-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleWithWebIdentityResult>\
</AssumeRoleWithWebIdentityResponse>";

#[tokio::test]
async fn web_identity_credentials_then_cloud_id() {
    let sts = start(|req| {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        if form_param(&body, "Action").as_deref() == Some("AssumeRoleWithWebIdentity")
            && form_param(&body, "WebIdentityToken").as_deref() == Some("projected.sa.jwt")
        {
            Resp::new(200, STS_OK).header("content-type", "text/xml")
        } else {
            Resp::new(400, "<ErrorResponse><Error><Code>InvalidIdentityToken</Code><Message>bad</Message></Error></ErrorResponse>")
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "projected.sa.jwt\n").unwrap();
    let cfg = ChainConfig {
        web_identity_token_file: Some(token_file.clone()),
        role_arn: Some("arn:aws:iam::111122223333:role/kms-plugin".into()),
        role_session_name: Some("test-session".into()),
        sts_endpoint: Some(sts.url.clone()),
        imds_disabled: true,
        ..Default::default()
    };
    let provider = CredentialsProvider::new(cfg.clone());
    let creds = provider.credentials().await.unwrap();
    assert_eq!(
        (creds.access_key_id(), creds.secret_access_key()),
        ("ASIAWEBID", "web/secret+key")
    );
    assert_eq!(creds.source(), "web-identity");
    assert!(creds.expires().is_some());
    let reqs = sts.requests();
    assert_eq!(reqs.len(), 1);
    let body = String::from_utf8_lossy(&reqs[0].body).into_owned();
    assert_eq!(
        form_param(&body, "RoleArn").as_deref(),
        Some("arn:aws:iam::111122223333:role/kms-plugin")
    );
    assert_eq!(
        form_param(&body, "RoleSessionName").as_deref(),
        Some("test-session")
    );

    // Cached: a second call does not ask STS again.
    provider.credentials().await.unwrap();
    assert_eq!(sts.requests().len(), 1);

    let id = aws_iam_cloud_id_from_chain(&provider, "https://sts.amazonaws.com/", "us-east-1")
        .await
        .unwrap();
    let (expected, claimed, headers) = verify_cloud_id(&id, "web/secret+key");
    assert_eq!(expected, claimed);
    assert_eq!(headers["X-Amz-Security-Token"], ["web-session-token"]);

    // STS refusing the token is a clear error without the token in it.
    std::fs::write(&token_file, "rejected.jwt").unwrap();
    let err = CredentialsProvider::new(cfg)
        .credentials()
        .await
        .unwrap_err();
    assert!(matches!(err, CredentialsError::WebIdentity(_)), "{err}");
    assert!(
        err.to_string().contains("InvalidIdentityToken")
            && !err.to_string().contains("rejected.jwt"),
        "{err}"
    );
}

#[tokio::test]
async fn imds_v2_credentials() {
    let imds = start(|req| {
        let token_ok = req.header("x-aws-ec2-metadata-token") == Some("imds-session");
        match (req.method.as_str(), req.path.as_str()) {
            ("PUT", "/latest/api/token") if req.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() => {
                Resp::new(200, "imds-session")
            }
            (_, _) if !token_ok => Resp::new(401, ""),
            ("GET", "/latest/meta-data/iam/security-credentials/") => Resp::new(200, "node-role\n"),
            ("GET", "/latest/meta-data/iam/security-credentials/node-role") => Resp::new(
                200,
                r#"{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"ASIAIMDS","SecretAccessKey":"imds-secret","Token":"imds-token","Expiration":"2099-01-01T00:00:00Z"}"#,
            ),
            _ => Resp::new(404, ""),
        }
    })
    .await;
    let cfg = ChainConfig {
        imds_endpoint: Some(imds.url.clone()),
        ..Default::default()
    };
    let creds = CredentialsProvider::new(cfg).credentials().await.unwrap();
    assert_eq!(
        (creds.access_key_id(), creds.session_token(), creds.source()),
        ("ASIAIMDS", Some("imds-token"), "imds")
    );
    let reqs = imds.requests();
    assert_eq!(reqs[0].method, "PUT");
    assert!(reqs[1..]
        .iter()
        .all(|r| r.header("x-aws-ec2-metadata-token") == Some("imds-session")));

    // No role attached: clear error. Nobody listening: fails fast.
    let no_role = start(|req| match req.method.as_str() {
        "PUT" => Resp::new(200, "t"),
        _ => Resp::new(404, ""),
    })
    .await;
    let err = CredentialsProvider::new(ChainConfig {
        imds_endpoint: Some(no_role.url.clone()),
        ..Default::default()
    })
    .credentials()
    .await
    .unwrap_err();
    assert!(matches!(err, CredentialsError::Imds(_)), "{err}");
    let started = Instant::now();
    let err = CredentialsProvider::new(ChainConfig {
        imds_endpoint: Some(closed_url()),
        ..Default::default()
    })
    .credentials()
    .await
    .unwrap_err();
    assert!(matches!(err, CredentialsError::Imds(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
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
    let creds = Credentials::new("AKIDNOW", "now-secret", None);
    let before = SystemTime::now();
    let id = aws_iam_cloud_id(&creds, "https://sts.amazonaws.com/", "us-east-1")
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
