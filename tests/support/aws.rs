//! AWS KMS backends on moto (or a scripted endpoint) with fixed test credentials.

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use kms_plugin::backend::aws_kms::{sdk_config, AwsKmsArgs, AwsKmsBackend};

pub const ACCESS_KEY: &str = "AKIDTESTING";
pub const SECRET_KEY: &str = "testing-secret";

pub fn test_credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
}

pub fn args(url: &str, key: &str, context: &[(&str, &str)]) -> AwsKmsArgs {
    AwsKmsArgs {
        aws_kms_key_id: Some(key.to_string()),
        aws_region: Some("us-east-1".into()),
        aws_endpoint_url: Some(url.to_string()),
        aws_kms_encryption_context: context
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// A backend on `url` for `key` with the test credentials (no credentials chain involved).
pub async fn backend(url: &str, key: &str, context: &[(&str, &str)]) -> AwsKmsBackend {
    backend_with(&args(url, key, context)).await
}

pub async fn backend_with(args: &AwsKmsArgs) -> AwsKmsBackend {
    let config = sdk_config(args, Some(test_credentials())).await.unwrap();
    AwsKmsBackend::new(args, &config).unwrap()
}

/// Creates a symmetric key; returns (key id, ARN).
pub async fn create_key(admin: &AwsKmsBackend) -> (String, String) {
    let r = admin
        .client()
        .create_key()
        .description("kms-plugin test")
        .send()
        .await
        .unwrap();
    let meta = r.key_metadata().unwrap();
    (meta.key_id().to_string(), meta.arn().unwrap().to_string())
}

/// Creates (`create`) or re-points an alias: how operators rotate.
pub async fn point_alias(admin: &AwsKmsBackend, create: bool, alias: &str, key: &str) {
    let c = admin.client();
    if create {
        c.create_alias()
            .alias_name(alias)
            .target_key_id(key)
            .send()
            .await
            .unwrap();
    } else {
        c.update_alias()
            .alias_name(alias)
            .target_key_id(key)
            .send()
            .await
            .unwrap();
    }
}

pub async fn set_enabled(admin: &AwsKmsBackend, key: &str, enabled: bool) {
    let c = admin.client();
    if enabled {
        c.enable_key().key_id(key).send().await.unwrap();
    } else {
        c.disable_key().key_id(key).send().await.unwrap();
    }
}

/// The environment a spawned plugin needs to reach moto with the test credentials, and nothing
/// from the machine's own AWS set-up (profiles, IMDS).
pub fn child_env(home: &std::path::Path) -> Vec<(String, String)> {
    let h = home.display();
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_CONFIG_FILE", format!("{h}/aws-config-absent")),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            format!("{h}/aws-credentials-absent"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
