//! The documented example configuration. The README quotes it and a test parses it back,
//! with every `;key = value` line uncommented, and compares the result with the built-in
//! defaults, so this text cannot drift from the code.

/// `/etc/opsagent.conf` with every key, commented out, showing its default (or an example
/// value for keys without a default). Documentation lines start with `; `, settable lines
/// with `;` directly followed by the key.
pub const EXAMPLE: &str = concat!(
    r#"; /etc/opsagent.conf: configuration of the opsagent daemon.
;
; Every key is optional. Each commented line shows the default, or an example value
; for keys without a default; remove the leading ';' to set it. An empty value means
; "not set". Unknown sections and keys are errors. Command-line flags override this file;
; [userdata] keys set nowhere are read from the instance userdata (KEY=value shell lines).

[userdata]
; Backend WebSocket URL, ws:// or wss://. Required to connect.
; Flag --ws-uri; userdata WS_URI.
;ws_uri = wss://backend.example.com/agent/
; The VisualOps app this instance belongs to. Required to connect. Changing it resets
; the instance token. Flag --app-id; userdata APP_ID.
;app_id = app-1234abcd
; Agent version the backend expects (informative). Default: this build's version.
; Userdata VERSION.
;version = "#,
    env!("CARGO_PKG_VERSION"),
    r#"
; Download base URL of agent releases, http:// or https://. Userdata BASE_REMOTE.
;base_remote = https://releases.example.com/opsagent
; Minisign public key (the base64 line of minisign.pub) that releases must be signed
; with. Userdata UPDATE_KEY.
;update_key = RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3
; Minisign public key(s) the backend signs recipes with (two, blank-separated, while
; rotating). Set: the root helper runs only states of recipes they signed; unset:
; recipes are not verified. Read by the helper from this root-owned file only.
; Userdata RECIPE_KEY.
;recipe_key = RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3
; Fixed instance id; when set, the cloud metadata service is not asked.
; Flag --instance-id; userdata INSTANCE_ID.
;instance_id = i-0abc1234def567890
; Base URL of the cloud metadata service (AWS IMDS or OpenStack).
;metadata_url = http://169.254.169.254

[agent]
; Instance token file (secret, mode 0600; a second line records its app id).
; Flag --token-file.
;token_file = /var/lib/visualops/opsagent/token
; State directory. Flag --state-dir.
;state_dir = /var/lib/visualops/opsagent
; Unix socket of the root helper. Flag --helper-socket.
;helper_socket = /run/opsagent-helper/helper.sock
; Seconds between two completed rounds of the recipe; 0 runs them back to back (a
; failed round still waits retry_delay). Flag --round-delay.
;round_delay = 600
; Seconds to wait after a round that ceased on a failure; doubles up to retry_delay_max.
; Flag --retry-delay.
;retry_delay = 5
;retry_delay_max = 300
; Log level (off, error, warn, info, debug, trace) or a filter such as info,opsagent=debug.
;log_level = info
; Largest download accepted for a state (common.archive, linux.file remote_uri), in
; bytes (1 GiB). Larger bodies are refused, by their Content-Length or while streaming.
;download_max_bytes = 1073741824
; Seconds one download attempt may take, body included; failed attempts are retried.
;download_timeout = 600
; Prometheus text file of the round's figures (start, end, duration, states ok/failed/
; changed, spool depth, connected, last successful round, recipe version), rewritten
; atomically at every round's end and every few seconds, for node_exporter's textfile
; collector (--collector.textfile.directory): name a *.prom file in a directory the
; opsagent user may write. Off when unset. Flag --metrics-file.
;metrics_file = /var/lib/prometheus/node-exporter/opsagent.prom
; Plaintext ws:// (or [link] tls_insecure) to a backend that is not on this host
; (loopback is always allowed). Whoever can impersonate the backend pushes recipes that
; run as root, so it is refused unless set here, in a root-owned file; warned at start and
; in `opsagent status`.
;allow_insecure_transport = false
; Before a state whose tool is missing (git, subversion, mercurial, ruby, npm, pip,
; virtualenv, supervisor, lvm2, xfsprogs, docker, puppet…), install its package with
; the host's package manager (apt or yum) as the original agent did; the state's comment
; says so, and the helper's policy judges that install like any package state. Off: the
; state fails naming the package to install.
;install_prerequisites = true
; Seconds after each round at which the daemon plans the recipe (changing nothing) and
; reports the states that would change: drift, e.g. a managed file edited by hand. To a
; backend that announced `drift` as a Drift message, otherwise in the journal
; (OPSAGENT_DRIFT=1) and `opsagent status`. 0: off (the default).
;drift_interval = 0
; Hosts without systemd only: the directories of the daemon's log (opsagent.log) and of
; the helper's and the upgrades' logs, read when a backend asks for logs (fetch-logs).
; With systemd the journal is read instead.
;log_dir = /var/log/visualops
;helper_log_dir = /var/log/opsagent-root

[link]
; Extra PEM bundle of trusted CAs for wss:// and https:// downloads (the system roots are
; always trusted).
;ca_file = /etc/opsagent/ca.pem
; Accept any server certificate. For tests only; off this host it also needs
; [agent] allow_insecure_transport, and a warning is logged at every connect.
;tls_insecure = false
; HTTP proxy for the backend connection (CONNECT) and downloads, http://[user:password@]host:port.
; Overrides the https_proxy / HTTPS_PROXY / http_proxy / all_proxy environment variables.
;proxy = http://proxy.example.com:3128
; Hosts reached without the proxy: names, .domains, IP addresses, CIDR blocks, each with an
; optional :port, separated by commas; * for all. Overrides no_proxy / NO_PROXY.
;no_proxy = localhost,127.0.0.0/8,.internal.example.com
; Seconds between WebSocket pings; a connection silent for two intervals is replaced.
;ping_interval = 30
; Seconds between Heartbeat messages (host vitals and agent state), sent only to a
; backend that announced the heartbeat extension.
;heartbeat_interval = 60
; Largest accepted frame, in bytes (16 MiB).
;max_frame = 16777216
; Consecutive invalid frames tolerated before the connection is replaced.
;max_bad_frames = 100
; Reconnect backoff in seconds: attempt k waits a random time between 0 and
; backoff_base * 2^(k-1), at most backoff_max (full jitter).
;backoff_base = 1
;backoff_max = 300

[upgrade]
; Self-upgrade on the backend's AgentUpdate: the daemon downloads the release and its
; signature; the root installer (opsagent-upgrade) checks them against update_key above,
; as written in this root-owned file (never the instance userdata), switches and restarts.
; Seconds a new release has to reach READY and complete a Handshake; otherwise the
; previous release is switched back and restarted. Read by the installer too. 5..3600.
;health_timeout = 60
; Seconds before a version that failed (rejected or reverted) is tried again; another
; version is tried at once.
;holdoff = 21600
; Largest release archive downloaded, in bytes (256 MiB).
;max_bytes = 268435456
; Whether the installer may install a release older than the running one (an operator's
; roll-back); without it a signed old release is refused. Honoured from a root-owned file.
;allow_downgrade = false
"#
);
