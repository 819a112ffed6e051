use super::*;
use std::io::Write as _;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/opsagent.conf"), text)
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

/// The example with every settable line (`;key = value`) uncommented.
fn example_uncommented() -> String {
    EXAMPLE
        .lines()
        .map(|l| match l.strip_prefix(';') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn defaults() {
    let c = Config::default();
    assert_eq!(c.source, None);
    assert_eq!(c.userdata.ws_uri, None);
    assert_eq!(c.userdata.app_id, None);
    assert_eq!(c.userdata.version(), env!("CARGO_PKG_VERSION"));
    assert_eq!(c.userdata.metadata_url, "http://169.254.169.254");
    assert_eq!(c.agent.token_file, Path::new("/var/lib/visualops/opsagent/token"));
    assert_eq!(c.agent.state_dir, Path::new("/var/lib/visualops/opsagent"));
    assert_eq!(c.agent.helper_socket, Path::new("/run/opsagent-helper/helper.sock"));
    assert_eq!(c.agent.round_delay, Duration::from_secs(600));
    assert_eq!(c.agent.retry_delay, Duration::from_secs(5));
    assert_eq!(c.agent.retry_delay_max, Duration::from_secs(300));
    assert_eq!(c.agent.log_level, "info");
    assert_eq!(c.agent.download_max_bytes, 1 << 30);
    assert_eq!(c.agent.download_timeout, Duration::from_secs(600));
    assert_eq!(c.link.ca_file, None);
    assert!(!c.link.tls_insecure);
    assert_eq!(c.link.proxy, None);
    assert_eq!(c.link.no_proxy, None);
    assert_eq!(c.link.ping_interval, Duration::from_secs(30));
    assert_eq!(c.link.heartbeat_interval, Duration::from_secs(60));
    assert_eq!(c.link.max_frame, 16 * 1024 * 1024);
    assert_eq!(c.link.max_bad_frames, 100);
    assert_eq!(c.link.backoff_base, Duration::from_secs(1));
    assert_eq!(c.link.backoff_max, Duration::from_secs(300));
    assert_eq!(parse("").unwrap(), Config { source: Some("/etc/opsagent.conf".into()), ..c });
}

#[test]
fn every_key_parsed() {
    let c = parse(
        "[userdata]\nws_uri = ws://127.0.0.1:8080/agent\napp_id = app-9\nversion = 2.0.1\n\
         base_remote = https://dl.example/opsagent/\nupdate_key = \"RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3\"\n\
         instance_id = i-0123\nmetadata_url = http://127.0.0.1:9/\n\
         [agent]\ntoken_file = /t/token\nstate_dir = /t\nhelper_socket = /t/h.sock\nround_delay = 60\n\
         retry_delay = 2\nretry_delay_max = 20\nlog_level = info,opsagent=debug\n\
         download_max_bytes = 2048\ndownload_timeout = 30\n\
         [link]\nca_file = /t/ca.pem\ntls_insecure = yes\nping_interval = 15\nmax_frame = 65536\n\
         backoff_base = 3\nbackoff_max = 30\nproxy = http://u:p@proxy:3128\nno_proxy = localhost, .corp\n\
         heartbeat_interval = 20\nmax_bad_frames = 7\n",
    )
    .unwrap();
    let u = &c.userdata;
    assert_eq!(u.ws_uri.as_deref(), Some("ws://127.0.0.1:8080/agent"));
    assert_eq!(u.app_id.as_deref(), Some("app-9"));
    assert_eq!(u.version(), "2.0.1");
    assert_eq!(u.base_remote.as_deref(), Some("https://dl.example/opsagent"));
    assert_eq!(u.update_key.as_deref(), Some("RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3"));
    assert_eq!(u.instance_id.as_deref(), Some("i-0123"));
    assert_eq!(u.metadata_url, "http://127.0.0.1:9");
    let a = &c.agent;
    assert_eq!(a.token_file, Path::new("/t/token"));
    assert_eq!(a.state_dir, Path::new("/t"));
    assert_eq!(a.helper_socket, Path::new("/t/h.sock"));
    assert_eq!(a.round_delay, Duration::from_secs(60));
    assert_eq!(a.retry_delay, Duration::from_secs(2));
    assert_eq!(a.retry_delay_max, Duration::from_secs(20));
    assert_eq!(a.log_level, "info,opsagent=debug");
    assert_eq!(a.download_max_bytes, 2048);
    assert_eq!(a.download_timeout, Duration::from_secs(30));
    let l = &c.link;
    assert_eq!(l.ca_file.as_deref(), Some(Path::new("/t/ca.pem")));
    assert!(l.tls_insecure);
    assert_eq!(l.ping_interval, Duration::from_secs(15));
    assert_eq!(l.max_frame, 65536);
    assert_eq!(l.backoff_base, Duration::from_secs(3));
    assert_eq!(l.backoff_max, Duration::from_secs(30));
    assert_eq!(l.proxy.as_deref(), Some("http://u:p@proxy:3128"));
    assert_eq!(l.no_proxy.as_deref(), Some("localhost, .corp"));
    assert_eq!(l.heartbeat_interval, Duration::from_secs(20));
    assert_eq!(l.max_bad_frames, 7);
    assert_eq!(c.require_backend().unwrap(), ("ws://127.0.0.1:8080/agent", "app-9"));
}

#[test]
fn empty_value_means_default() {
    let c = parse("[agent]\nround_delay =\n[userdata]\napp_id = \"\"\n").unwrap();
    assert_eq!(c.agent.round_delay, Duration::from_secs(600));
    assert_eq!(c.userdata.app_id, None);
}

#[test]
fn drift_interval_is_off_by_default_and_when_zero() {
    assert_eq!(parse("").unwrap().agent.drift_interval, None);
    assert_eq!(parse("[agent]\ndrift_interval = 0\n").unwrap().agent.drift_interval, None);
    assert_eq!(parse("[agent]\ndrift_interval = 300\n").unwrap().agent.drift_interval, Some(Duration::from_secs(300)));
    assert!(parse("[agent]\ndrift_interval = soon\n").is_err());
}

#[test]
fn overrides_win() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opsagent.conf");
    std::fs::write(&path, "[userdata]\nws_uri = wss://file/\napp_id = file-app\n[agent]\nround_delay = 60\n").unwrap();
    let overrides = Overrides {
        ws_uri: Some("wss://flag/".into()),
        app_id: Some("flag-app".into()),
        instance_id: Some("i-flag".into()),
        token_file: Some("/f/token".into()),
        state_dir: Some("relative/state".into()),
        helper_socket: Some("/f/h.sock".into()),
        round_delay: Some(7),
        retry_delay: Some(3),
        metrics_file: Some("/f/opsagent.prom".into()),
    };
    let c = Config::load(Some(&path), &overrides).unwrap();
    assert_eq!(c.source.as_deref(), Some(path.as_path()));
    assert_eq!(c.require_backend().unwrap(), ("wss://flag/", "flag-app"));
    assert_eq!(c.userdata.instance_id.as_deref(), Some("i-flag"));
    assert_eq!(c.agent.token_file, Path::new("/f/token"));
    // A relative flag path is taken from the current directory.
    assert_eq!(c.agent.state_dir, std::env::current_dir().unwrap().join("relative/state"));
    assert_eq!(c.agent.helper_socket, Path::new("/f/h.sock"));
    assert_eq!(c.agent.round_delay, Duration::from_secs(7));
    assert_eq!(c.agent.retry_delay, Duration::from_secs(3));
    assert_eq!(c.agent.metrics_file.as_deref(), Some(Path::new("/f/opsagent.prom")));
}

#[test]
fn metrics_file_is_off_by_default_and_must_be_absolute() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opsagent.conf");
    std::fs::write(&path, "").unwrap();
    assert_eq!(Config::load(Some(&path), &Overrides::default()).unwrap().agent.metrics_file, None);
    std::fs::write(&path, "[agent]\nmetrics_file = /var/lib/node-exporter/opsagent.prom\n").unwrap();
    let c = Config::load(Some(&path), &Overrides::default()).unwrap();
    assert_eq!(c.agent.metrics_file.as_deref(), Some(Path::new("/var/lib/node-exporter/opsagent.prom")));
    std::fs::write(&path, "[agent]\nmetrics_file = opsagent.prom\n").unwrap();
    let e = Config::load(Some(&path), &Overrides::default()).unwrap_err().to_string();
    assert!(e.contains("metrics_file"), "{e}");
}

#[test]
fn invalid_flags_name_the_flag() {
    let bad = |o: Overrides| Config::load_or_default_from(Path::new("/nonexistent"), None, &o).unwrap_err().to_string();
    let e = bad(Overrides { ws_uri: Some("http://x/".into()), ..Default::default() });
    assert_eq!(e, r#"command line: --ws-uri: "http://x/" must start with ws:// or wss://"#);
    let zero = Config::load_or_default_from(
        Path::new("/nonexistent"),
        None,
        &Overrides { round_delay: Some(0), ..Default::default() },
    )
    .unwrap();
    assert_eq!(zero.agent.round_delay, Duration::ZERO, "--round-delay 0: rounds back to back");
    let e = bad(Overrides { retry_delay: Some(0), ..Default::default() });
    assert_eq!(e, "command line: --retry-delay: 0 is too small: at least 1 second");
    let e = bad(Overrides { retry_delay: Some(301), ..Default::default() });
    assert!(
        e.starts_with("command line and defaults: [agent] retry_delay (301 s) is greater than retry_delay_max (300 s)"),
        "{e}"
    );
}

#[test]
fn invalid_values_name_file_section_and_key() {
    let cases = [
        (
            "[agent]\nround_delay = ten\n",
            r#"/etc/opsagent.conf:2: [agent] round_delay: "ten" is not a whole number of seconds"#,
        ),
        (
            "[userdata]\nws_uri = https://b/\n",
            r#"/etc/opsagent.conf:2: [userdata] ws_uri: "https://b/" must start with ws:// or wss://"#,
        ),
        (
            "[userdata]\nbase_remote = ftp://b/\n",
            r#"[userdata] base_remote: "ftp://b/" must start with http:// or https://"#,
        ),
        ("[userdata]\nmetadata_url = nope\n", "[userdata] metadata_url: \"nope\" is not a URL"),
        ("[userdata]\napp_id = my app\n", r#"[userdata] app_id: "my app" contains ' '"#),
        ("[userdata]\ninstance_id = \"i 1\"\n", "[userdata] instance_id: \"i 1\" contains"),
        ("[userdata]\nversion = \"1 2\"\n", "[userdata] version: \"1 2\" contains"),
        ("[userdata]\nupdate_key = untrusted comment\n", "[userdata] update_key: \"untrusted comment\" is not base64"),
        ("[agent]\nstate_dir = var/lib\n", r#"[agent] state_dir: "var/lib" is not an absolute path"#),
        ("[agent]\nretry_delay_max = 0\n", "[agent] retry_delay_max: 0 is too small"),
        ("[agent]\nlog_level = verbose\n", r#"[agent] log_level: "verbose" is not a log level"#),
        ("[agent]\ndownload_max_bytes = 1GiB\n", r#"[agent] download_max_bytes: "1GiB" is not a whole number"#),
        ("[agent]\ndownload_max_bytes = 10\n", "[agent] download_max_bytes: 10 is out of range"),
        ("[agent]\ndownload_timeout = 0\n", "[agent] download_timeout: 0 is too small"),
        ("[link]\ntls_insecure = maybe\n", r#"[link] tls_insecure: "maybe" is not a boolean"#),
        ("[link]\nmax_frame = 16MiB\n", r#"[link] max_frame: "16MiB" is not a whole number of bytes"#),
        ("[link]\nping_interval = 1e3\n", "[link] ping_interval: \"1e3\" is not a whole number of seconds"),
        ("[link]\nca_file = ca.pem\n", "[link] ca_file: \"ca.pem\" is not an absolute path"),
        (
            "[link]\nproxy = socks5://p:1080\n",
            "[link] proxy: \"socks5://p:1080\": proxy scheme socks5:// is not supported",
        ),
        ("[link]\nmax_bad_frames = 0\n", "[link] max_bad_frames: 0 is out of range"),
        ("[link]\nheartbeat_interval = 0\n", "[link] heartbeat_interval: 0 is too small"),
    ];
    for (text, expected) in cases {
        let e = err(text);
        assert!(e.starts_with("/etc/opsagent.conf:2: ") && e.contains(expected), "{text:?}: {e}");
    }
    let e = err("[link]\nbackoff_base = 10\nbackoff_max = 5\n");
    assert_eq!(
        e,
        "/etc/opsagent.conf: [link] backoff_base (10 s) is greater than backoff_max (5 s); raise backoff_max or lower both"
    );
}

#[test]
fn unknown_names_and_structure_errors() {
    assert_eq!(
        err("[agent]\nround_dealy = 5\n"),
        "/etc/opsagent.conf:2: [agent] round_dealy: unknown key (keys of [agent]: token_file, state_dir, \
         helper_socket, round_delay, retry_delay, retry_delay_max, log_level, download_max_bytes, download_timeout, metrics_file, \
         allow_insecure_transport, install_prerequisites, drift_interval, log_dir, helper_log_dir)"
    );
    assert_eq!(
        err("[agnet]\n"),
        "/etc/opsagent.conf:1: unknown section [agnet] (known sections: [userdata], [agent], [link], [upgrade])"
    );
    assert!(err("app_id = x\n").starts_with("/etc/opsagent.conf:1: app_id: key outside any section"));
    assert_eq!(
        err("[agent]\nround_delay = 5\n[agent]\nround_delay = 6\n"),
        "/etc/opsagent.conf:4: [agent] round_delay: set twice (first on line 2)"
    );
    assert!(err("[agent]\nround_delay\n").starts_with("/etc/opsagent.conf:2: \"round_delay\" is neither"));
}

#[test]
fn missing_explicit_file_is_an_error_missing_default_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.conf");
    let e = Config::load(Some(&absent), &Overrides::default()).unwrap_err();
    assert!(matches!(e, ConfigError::NotFound { .. }));
    assert_eq!(e.to_string(), format!("{}: configuration file not found", absent.display()));
    let c = Config::load_or_default_from(&absent, None, &Overrides::default()).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn default_file_is_read_when_present() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "[agent]\nround_delay = 42").unwrap();
    let c = Config::load_or_default_from(file.path(), None, &Overrides::default()).unwrap();
    assert_eq!(c.agent.round_delay, Duration::from_secs(42));
    assert_eq!(c.source.as_deref(), Some(file.path()));
}

#[test]
fn unreadable_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    // A directory cannot be read as a file, even by root.
    let e = Config::load(Some(dir.path()), &Overrides::default()).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: cannot read the configuration file: ", dir.path().display())), "{e}");
}

#[test]
fn require_backend_names_the_missing_key_and_how_to_set_it() {
    let c = Config::default();
    assert_eq!(
        c.require_backend().unwrap_err().to_string(),
        "[userdata] ws_uri is not set: set `ws_uri = …` under [userdata] in /etc/opsagent.conf, \
         pass --ws-uri, or put WS_URI=… in the instance userdata"
    );
    let c = parse("[userdata]\nws_uri = wss://b/\n").unwrap();
    let e = c.require_backend().unwrap_err().to_string();
    assert!(e.starts_with("[userdata] app_id is not set") && e.contains("--app-id") && e.contains("APP_ID="), "{e}");
}

#[test]
fn set_if_unset_keeps_file_values() {
    let mut c = parse("[userdata]\napp_id = from-file\n").unwrap();
    let ud = || Origin::Userdata { url: "http://md/latest/user-data".into(), var: "X".into() };
    assert!(!c.set_if_unset(ud(), "userdata", "app_id", "from-userdata").unwrap());
    assert!(c.set_if_unset(ud(), "userdata", "ws_uri", "wss://ud/").unwrap());
    assert!(!c.set_if_unset(ud(), "agent", "round_delay", "5").unwrap(), "defaulted keys are never unset");
    assert_eq!(c.require_backend().unwrap(), ("wss://ud/", "from-file"));
    let e = c.set_if_unset(ud(), "userdata", "base_remote", "s3://x").unwrap_err().to_string();
    assert!(e.starts_with("userdata http://md/latest/user-data: X ([userdata] base_remote): "), "{e}");
}

#[test]
fn example_parses_to_the_defaults() {
    assert_eq!(parse(EXAMPLE).unwrap(), parse("").unwrap(), "all commented out");
    let c = parse(&example_uncommented()).unwrap();
    let d = Config::default();
    // The example names a metrics file to show the key; the default is none.
    assert_eq!(c.agent.metrics_file.as_deref(), Some(Path::new("/var/lib/prometheus/node-exporter/opsagent.prom")));
    assert_eq!(
        AgentConfig { metrics_file: None, ..c.agent.clone() },
        d.agent,
        "[agent] defaults in EXAMPLE match the code"
    );
    assert_eq!(c.link.ca_file.as_deref(), Some(Path::new("/etc/opsagent/ca.pem")));
    assert_eq!(c.link.proxy.as_deref(), Some("http://proxy.example.com:3128"));
    assert!(c.link.no_proxy.is_some());
    assert_eq!(
        LinkConfig { ca_file: None, proxy: None, no_proxy: None, ..c.link.clone() },
        d.link,
        "[link] defaults in EXAMPLE match the code"
    );
    assert_eq!(c.userdata.metadata_url, d.userdata.metadata_url);
    assert_eq!(c.userdata.version(), d.userdata.version());
    for value in [
        &c.userdata.ws_uri,
        &c.userdata.app_id,
        &c.userdata.base_remote,
        &c.userdata.update_key,
        &c.userdata.recipe_key,
        &c.userdata.instance_id,
    ] {
        assert!(value.is_some(), "every [userdata] key has an example value");
    }
}

#[test]
fn example_and_setters_cover_every_key() {
    let uncommented = example_uncommented();
    for (section, keys) in SECTIONS {
        assert!(EXAMPLE.contains(&format!("[{section}]")), "{section}");
        for key in *keys {
            assert!(uncommented.lines().any(|l| l.starts_with(&format!("{key} = "))), "EXAMPLE lacks {key}");
            let mut c = Config::default();
            let e = c.set(section, key, "\u{1}").unwrap_err();
            assert!(!e.contains("no setter"), "[{section}] {key} has no setter");
        }
    }
}

#[test]
fn exit_code_is_two() {
    assert_eq!(ConfigError::EXIT_CODE, 2);
}

#[test]
fn overrides_flags_parse_with_clap() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        overrides: Overrides,
    }
    let cli = Cli::try_parse_from([
        "opsagent",
        "--ws-uri",
        "wss://b/",
        "--app-id",
        "a",
        "--instance-id",
        "i",
        "--token-file",
        "/t",
        "--state-dir",
        "/s",
        "--helper-socket",
        "/h",
        "--round-delay",
        "9",
        "--retry-delay",
        "4",
    ])
    .unwrap();
    assert_eq!(cli.overrides.ws_uri.as_deref(), Some("wss://b/"));
    assert_eq!(cli.overrides.round_delay, Some(9));
    assert_eq!(cli.overrides.retry_delay, Some(4));
    assert_eq!(cli.overrides.helper_socket.as_deref(), Some(Path::new("/h")));
    assert!(Cli::try_parse_from(["opsagent", "--round-delay", "ten"]).is_err());
}

#[test]
fn keys_that_lower_a_defence_need_a_root_owned_file() {
    use std::os::unix::fs::PermissionsExt;
    // Text that is not a trusted file: `true` is refused, naming the line; `false` is fine.
    for key in ["[agent]\nallow_insecure_transport = true\n", "[upgrade]\nallow_downgrade = yes\n"] {
        let e = parse(key).unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("owned by root"), "{e}");
    }
    assert!(!parse("[agent]\nallow_insecure_transport = false\n").unwrap().agent.allow_insecure_transport);
    assert!(parse("").unwrap().agent.install_prerequisites, "on by default, as the original");
    assert!(!parse("[agent]\ninstall_prerequisites = false\n").unwrap().agent.install_prerequisites);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opsagent.conf");
    std::fs::write(&path, "[agent]\nallow_insecure_transport = true\n[upgrade]\nallow_downgrade = true\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let me = nix::unistd::geteuid().as_raw();
    let load = |owner| Config::load_trusting(Path::new("/nonexistent"), Some(&path), &Overrides::default(), owner);
    let c = load(me).unwrap();
    assert!(c.agent.allow_insecure_transport && c.upgrade.allow_downgrade);
    let e = load(me + 1).unwrap_err().to_string();
    assert!(e.contains("allow_insecure_transport") && e.contains("owned by root"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
    assert!(load(me).is_err(), "a group-writable file is not root's alone");
}

/// Issue #18 item 8: the original's own test configuration (copied unchanged into
/// tests/fixtures/original/) is read: its `[userdata]` taken, the rest warned about,
/// no refusal.
#[test]
fn the_original_test_configuration_is_read() {
    let text = include_str!("../../tests/fixtures/original/opsagent.conf");
    let c = parse(text).unwrap();
    assert!(c.original_format);
    assert_eq!(c.userdata.ws_uri.as_deref(), Some("ws://127.0.0.1:9000/agent/"));
    assert_eq!(c.userdata.app_id.as_deref(), Some("app-id"));
    assert_eq!(c.userdata.version.as_deref(), Some("1.0"));
    assert_eq!(c.userdata.base_remote.as_deref(), Some("https://s3.amazonaws.com/opsagent"));
    assert_eq!(c.agent.state_dir, Path::new("/var/lib/visualops/opsagent"), "[global] conf_path");
    let warned = c.warnings.join("\n");
    for key in
        ["[global] platform", "[global] token", "[userdata] gpg_key_uri", "[module] mod_tag", "[network] get_retry"]
    {
        assert!(warned.contains(key), "{key} not warned about:\n{warned}");
    }
    assert!(!warned.contains("ws_uri") && !warned.contains("conf_path"), "{warned}");
}

/// The shape scripts/init.sh writes, with the sections config.py gave defaults for:
/// `[salt] delay` (minutes) is the round delay, `[network] instance_id` the metadata
/// service; a value that does not check is a warning, never a refusal.
#[test]
fn the_original_init_sh_shape_maps_known_keys_and_warns_once_about_the_rest() {
    let text = "[global]\nplatform=APT\nenvroot=/opt/visualops/env\nconf_path=/var/lib/visualops/opsagent\n\
                loglvl=DEBUG\ntoken=/etc/opsagent.token\n[userdata]\nws_uri=wss://api.visualops.io:443/agent/\n\
                app_id=app-1a2b3c\nversion=2015-03-31\nbase_remote=https://s3.amazonaws.com/visualops\n\
                gpg_key_uri=https://s3.amazonaws.com/visualops/madeira.gpg.public.key\n[module]\n\
                root=/opt/visualops/bootstrap\nname=salt\nmod_repo=\nmod_tag=\n[network]\n\
                instance_id=http://10.1.2.3/latest/meta-data/instance-id\n[salt]\ndelay=5\ntimeout=30\n";
    let c = parse(text).unwrap();
    assert_eq!(c.agent.round_delay, Duration::from_secs(300));
    assert_eq!(c.agent.log_level, "debug");
    assert_eq!(c.userdata.metadata_url, "http://10.1.2.3");
    assert_eq!(c.userdata.app_id.as_deref(), Some("app-1a2b3c"));
    assert_eq!(c.warnings.iter().filter(|w| w.contains("[salt] timeout")).count(), 1);
    assert!(c.warnings.iter().all(|w| !w.contains("mod_repo")), "empty values are not set: {:?}", c.warnings);
    // worker.py slept `delay * 60` seconds, so 0 ran rounds back to back: it still does.
    let c = parse("[salt]\ndelay=0\n").unwrap();
    assert_eq!(c.agent.round_delay, Duration::ZERO);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let c = parse("[salt]\ndelay=soon\n[mystery]\nx=1\n").unwrap();
    assert!(c.warnings.iter().any(|w| w.contains("[salt] delay ignored") && w.contains("soon")), "{:?}", c.warnings);
    assert!(c.warnings.iter().any(|w| w.contains("[mystery] x")), "{:?}", c.warnings);
    // Our own format stays strict.
    assert!(err("[mystery]\nx=1\n").contains("mystery"));
}
