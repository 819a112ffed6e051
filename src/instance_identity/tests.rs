//! Metadata service tests against a real HTTP server on 127.0.0.1.

use std::time::Duration;

use super::test_server::{serve, Request};
use super::*;

const TOKEN: &str = "AQAEAFakeToken==";

/// Fast retries: real time, tiny pauses.
fn quick(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        first_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        request_timeout: Duration::from_secs(2),
    }
}

fn call(method: &str, path: &str) -> (String, String) {
    (method.to_string(), path.to_string())
}

/// An AWS IMDS that requires v2 tokens when `v2` is true, and answers 404 to OpenStack paths.
fn aws(v2: bool, userdata: Option<&'static str>) -> impl Fn(&Request) -> Option<(u16, String)> {
    move |r| {
        let has_token = r.header("x-aws-ec2-metadata-token") == Some(TOKEN);
        Some(match (r.method.as_str(), r.path.as_str()) {
            ("PUT", "/latest/api/token") if !v2 => (405, String::new()),
            ("PUT", "/latest/api/token") if r.header("x-aws-ec2-metadata-token-ttl-seconds") == Some("21600") => {
                (200, TOKEN.to_string())
            }
            ("PUT", "/latest/api/token") => (400, String::new()),
            ("GET", _) if v2 && !has_token => (401, String::new()),
            ("GET", "/latest/meta-data/instance-id") => (200, "i-0abc123\n".to_string()),
            ("GET", "/latest/user-data") => match userdata {
                Some(text) => (200, text.to_string()),
                None => (404, String::new()),
            },
            _ => (404, String::new()),
        })
    }
}

#[tokio::test]
async fn imdsv2_token_is_used() {
    let server = serve(aws(true, None)).await;
    let client = MetadataClient::new(&server.base, quick(3)).unwrap();
    assert_eq!(client.instance_id().await.unwrap(), "i-0abc123");
    let requests = server.requests();
    assert_eq!(
        server.calls(),
        vec![
            call("GET", "/openstack/latest/meta_data.json"),
            call("PUT", "/latest/api/token"),
            call("GET", "/latest/meta-data/instance-id"),
        ]
    );
    assert_eq!(requests[2].header("x-aws-ec2-metadata-token"), Some(TOKEN));
}

#[tokio::test]
async fn imdsv1_when_tokens_are_not_supported() {
    let server = serve(aws(false, None)).await;
    let client = MetadataClient::new(&format!("{}/", server.base), quick(3)).unwrap();
    assert_eq!(client.instance_id().await.unwrap(), "i-0abc123");
    let requests = server.requests();
    assert_eq!(requests.last().unwrap().path, "/latest/meta-data/instance-id");
    assert_eq!(requests.last().unwrap().header("x-aws-ec2-metadata-token"), None);
}

#[tokio::test]
async fn openstack_uuid_comes_first() {
    // OpenStack also serves the EC2-style id; the uuid is what the backend knows.
    let server = serve(|r: &Request| {
        Some(match r.path.as_str() {
            "/openstack/latest/meta_data.json" => {
                (200, r#"{"uuid": "9c1f1a5e-0d3e-4b7a-9a55-3c0e6c8d1f2a", "name": "web"}"#.into())
            }
            "/latest/meta-data/instance-id" => (200, "i-0000000a".into()),
            _ => (404, String::new()),
        })
    })
    .await;
    let client = MetadataClient::new(&server.base, quick(3)).unwrap();
    assert_eq!(client.instance_id().await.unwrap(), "9c1f1a5e-0d3e-4b7a-9a55-3c0e6c8d1f2a");
    assert_eq!(server.calls(), vec![call("GET", "/openstack/latest/meta_data.json")]);
}

#[tokio::test]
async fn transient_failures_are_retried_a_bounded_number_of_times() {
    let server = serve(|_: &Request| Some((503, String::new()))).await;
    let client = MetadataClient::new(&server.base, quick(4)).unwrap();
    let e = client.instance_id().await.unwrap_err();
    let IdentityError::NoInstanceId { attempts, answers, .. } = &e else { panic!("{e}") };
    assert_eq!(*attempts, 4);
    assert_eq!(server.requests().len(), 4 * 3, "openstack, imdsv2 token, imdsv1 per attempt");
    assert_eq!(answers.len(), 3);
    assert_eq!(
        e.to_string(),
        format!(
            "no instance id from the metadata service at {} after 4 attempt(s) (set [userdata] instance_id \
             or --instance-id to skip it); last answers: openstack (GET /openstack/latest/meta_data.json): \
             HTTP 503; aws-imdsv2 (PUT /latest/api/token): HTTP 503; aws-imdsv1 (GET \
             /latest/meta-data/instance-id): HTTP 503",
            server.base
        )
    );
}

#[tokio::test]
async fn definitive_answers_are_not_retried() {
    let server = serve(|r: &Request| {
        Some(match r.path.as_str() {
            "/openstack/latest/meta_data.json" => (200, "{\"name\": \"no uuid\"}".into()),
            "/latest/meta-data/instance-id" => (200, "i have spaces".into()),
            _ => (404, String::new()),
        })
    })
    .await;
    let client = MetadataClient::new(&server.base, quick(5)).unwrap();
    let e = client.instance_id().await.unwrap_err().to_string();
    assert_eq!(server.requests().len(), 3, "one attempt only");
    assert!(e.contains("after 1 attempt(s)"), "{e}");
    assert!(
        e.contains("openstack (GET /openstack/latest/meta_data.json): not a JSON object with a string \"uuid\""),
        "{e}"
    );
    assert!(e.contains("aws-imdsv2 (PUT /latest/api/token): HTTP 404"), "{e}");
    assert!(
        e.contains(
            "aws-imdsv1 (GET /latest/meta-data/instance-id): invalid instance id: \"i have spaces\" contains ' '"
        ),
        "{e}"
    );
}

#[tokio::test]
async fn unreachable_service_gives_up() {
    // A port nobody listens on: connection refused, every time.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = MetadataClient::new(&base, quick(3)).unwrap();
    let e = client.instance_id().await.unwrap_err().to_string();
    assert!(e.contains("after 3 attempt(s)"), "{e}");
    assert!(e.to_lowercase().contains("connection refused") || e.contains("connect"), "{e}");
}

#[tokio::test]
async fn silent_service_times_out() {
    let server = serve(|_: &Request| None).await;
    let policy = RetryPolicy { request_timeout: Duration::from_millis(100), ..quick(1) };
    let client = MetadataClient::new(&server.base, policy).unwrap();
    let e = client.instance_id().await.unwrap_err().to_string();
    assert!(e.contains("openstack (GET /openstack/latest/meta_data.json): timed out after 100 ms"), "{e}");
}

#[tokio::test]
async fn userdata_with_and_without_tokens() {
    let text = "#!/bin/sh\nAPP_ID=app-ud\nWS_URI=wss://ud.example/agent\n";
    for v2 in [true, false] {
        let server = serve(aws(v2, Some(text))).await;
        let client = MetadataClient::new(&server.base, quick(2)).unwrap();
        let userdata = client.userdata().await.unwrap().unwrap();
        assert_eq!(userdata.app_id.as_deref(), Some("app-ud"), "v2={v2}");
    }
    let server = serve(aws(true, None)).await;
    let client = MetadataClient::new(&server.base, quick(2)).unwrap();
    assert_eq!(client.userdata().await.unwrap(), None, "404: no userdata");

    let server = serve(|_: &Request| Some((500, String::new()))).await;
    let client = MetadataClient::new(&server.base, quick(2)).unwrap();
    let e = client.userdata().await.unwrap_err().to_string();
    assert_eq!(
        e,
        format!("cannot read the instance userdata at {}/latest/user-data after 2 attempt(s): HTTP 500", server.base)
    );
}

#[tokio::test]
async fn resolve_fills_from_userdata_and_creates_the_token() {
    let server = serve(aws(true, Some("export APP_ID=app-ud\nWS_URI=\"wss://ud.example/agent\"\n"))).await;
    let dir = tempfile::tempdir().unwrap();
    let text =
        format!("[userdata]\nmetadata_url = {}\n[agent]\ntoken_file = {}/token\n", server.base, dir.path().display());
    let mut config = Config::parse("/etc/opsagent.conf".as_ref(), &text).unwrap();
    let identity = Identity::resolve(&mut config, &quick(2)).await.unwrap();
    assert_eq!(identity.instance_id, "i-0abc123");
    assert_eq!(identity.app_id, "app-ud");
    assert_eq!(identity.instance_token, load_or_create_token(&dir.path().join("token"), "app-ud").unwrap());
    assert_eq!(config.require_backend().unwrap(), ("wss://ud.example/agent", "app-ud"));
    assert!(!format!("{identity:?}").contains(&identity.instance_token));
}

#[tokio::test]
async fn resolve_with_overrides_never_asks_the_metadata_service() {
    let server = serve(aws(true, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[userdata]\nmetadata_url = {}\nws_uri = wss://b/\napp_id = a1\ninstance_id = i-fixed\n[agent]\ntoken_file = {}/t\n",
        server.base,
        dir.path().display()
    );
    let mut config = Config::parse("/etc/opsagent.conf".as_ref(), &text).unwrap();
    let identity = Identity::resolve(&mut config, &quick(2)).await.unwrap();
    assert_eq!((identity.instance_id.as_str(), identity.app_id.as_str()), ("i-fixed", "a1"));
    assert_eq!(resolve_instance_id(&config, &quick(2)).await.unwrap(), "i-fixed");
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn resolve_without_app_anywhere_says_how_to_set_it() {
    let server = serve(aws(false, Some("WS_URI=wss://only-ws/\n"))).await;
    let mut config =
        Config::parse("/etc/opsagent.conf".as_ref(), &format!("[userdata]\nmetadata_url = {}\n", server.base)).unwrap();
    let e = Identity::resolve(&mut config, &quick(2)).await.unwrap_err();
    assert!(matches!(e, IdentityError::Config(ConfigError::Missing { key: "app_id", .. })), "{e}");
}

#[test]
fn instance_id_validation() {
    assert_eq!(validate_instance_id(" i-0abc\n").unwrap(), "i-0abc");
    assert!(validate_instance_id("").unwrap_err().contains("empty"));
    assert!(validate_instance_id("a\u{7}b").is_err());
    assert!(validate_instance_id(&"x".repeat(300)).unwrap_err().contains("at most 255"));
}

#[test]
fn backoff_doubles_and_is_capped() {
    let p = RetryPolicy::default();
    let delays: Vec<_> = (1..=6).map(|a| p.delay_after(a).as_millis()).collect();
    assert_eq!(delays, vec![500, 1000, 2000, 4000, 4000, 4000]);
    assert_eq!(p.delay_after(100), Duration::from_secs(4));
}
