//! The session machine alone: events and instants in, actions out; no socket, no runtime.

use super::*;
use crate::protocol::parse_inbound;

const S: fn(u64) -> Duration = Duration::from_secs;

fn cfg() -> LinkConfig {
    LinkConfig {
        ws_uri: "ws://backend.test/agent".into(),
        ping_interval: S(30),
        answer_timeout: S(20),
        heartbeat_interval: S(60),
        max_bad_frames: 100,
        app_not_ready_retry: S(30),
        ..LinkConfig::default()
    }
}

fn params(logs: bool) -> Params {
    Params {
        url: "ws://backend.test/agent".into(),
        instance_id: "i-1".into(),
        app_id: "app-1".into(),
        init_errors: None,
        logs,
    }
}

/// A session opened at `t0`, its Handshake already taken.
fn open(cfg: &LinkConfig, logs: bool) -> (Session, Instant) {
    let t0 = Instant::now();
    let mut s = Session::new(t0, cfg, params(logs), Backoff::new(S(1), S(300), 7));
    let first = s.start();
    assert!(matches!(first.first(), Some(Action::Send(Outbound::Handshake { .. }))), "{first:?}");
    (s, t0)
}

fn msg(json: &str) -> SessionEvent {
    SessionEvent::Frame(Frame::Message(parse_inbound(json).unwrap()))
}

fn recipe(version: u64) -> SessionEvent {
    msg(&format!(
        r#"{{"code":"RecipeMetadata","recipe_version":{version},"state":[
            {{"id":"c","module":"meta.comment","parameter":{{"comment":"hi"}}}}]}}"#
    ))
}

fn caps(list: &[&str]) -> SessionEvent {
    msg(&serde_json::json!({"code": "Capabilities", "capabilities": list}).to_string())
}

fn log(seq: u64) -> StateLog {
    StateLog {
        recipe_version: 1,
        state_id: format!("s{seq}"),
        result: true,
        comment: None,
        stdout: None,
        seq: Some(seq),
        offline: true,
        ran_at: Some("2026-12-04T05:00:00.000Z".into()),
    }
}

fn sends(acts: &[Action]) -> Vec<&Outbound> {
    acts.iter().filter_map(|a| if let Action::Send(m) = a { Some(m) } else { None }).collect()
}

fn notices(acts: &[Action]) -> Vec<&Notice> {
    acts.iter().filter_map(|a| if let Action::Notice(n) = a { Some(n) } else { None }).collect()
}

fn end(acts: &[Action]) -> Option<&EndKind> {
    let e = acts.iter().find_map(|a| if let Action::End(k) = a { Some(k) } else { None });
    if e.is_some() {
        assert!(matches!(acts.last(), Some(Action::End(_))), "nothing may follow the end: {acts:?}");
    }
    e
}

fn collects(acts: &[Action]) -> Vec<Collect> {
    acts.iter().filter_map(|a| if let Action::Collect(c) = a { Some(*c) } else { None }).collect()
}

#[test]
fn only_known_capabilities_count() {
    let c = Caps::from_backend(&["heartbeat".into(), "teleport".into()]);
    assert!(c.announced && c.heartbeat && !c.acks && !c.hints);
    let c = Caps::default();
    assert!(!c.announced && !c.heartbeat);
}

#[test]
fn the_handshake_announces_fetch_logs_only_with_a_log_service() {
    for logs in [false, true] {
        let mut s = Session::new(Instant::now(), &cfg(), params(logs), Backoff::new(S(1), S(300), 7));
        let acts = s.start();
        let Some(Action::Send(Outbound::Handshake { capabilities, .. })) = acts.first() else { panic!("{acts:?}") };
        assert_eq!(capabilities.iter().any(|c| c == capability::FETCH_LOGS), logs, "{capabilities:?}");
        assert!(capabilities.iter().any(|c| c == capability::STATELOG_ACK));
        assert!(matches!(notices(&acts)[..], [Notice::HandshakeSent { .. }]), "{acts:?}");
    }
}

#[test]
fn an_unanswered_handshake_ends_the_session_at_the_answer_deadline_and_an_answer_lifts_it() {
    let c = cfg();
    let (mut s, t0) = open(&c, false);
    assert_eq!(s.next_deadline(), t0, "the first liveness tick is at once");
    let acts = s.on_event(t0, SessionEvent::Timer);
    assert!(matches!(acts[..], [Action::Alive]), "{acts:?}");
    // Pongs keep the connection alive, but they are no answer.
    let mut t = t0;
    while t + S(10) < t0 + c.answer_timeout {
        t += S(10);
        assert!(end(&s.on_event(t, SessionEvent::Frame(Frame::Control))).is_none());
        assert!(end(&s.on_event(t, SessionEvent::Timer)).is_none(), "{t:?}");
    }
    let due = t0 + c.answer_timeout;
    assert!(s.next_deadline() <= due);
    let acts = s.on_event(due, SessionEvent::Timer);
    assert!(matches!(end(&acts), Some(EndKind::Error(LinkError::NoAnswer { secs: 20, .. }))), "{acts:?}");
    assert!(!s.end(due, EndKind::TestDone).healthy, "never answered");

    // Any known message is an answer.
    let (mut s, t0) = open(&c, false);
    s.on_event(t0 + S(1), caps(&[]));
    let acts = s.on_event(t0 + c.answer_timeout, SessionEvent::Timer);
    assert!(end(&acts).is_none(), "{acts:?}");
}

#[test]
fn app_not_ready_repeats_the_handshake_on_the_same_connection() {
    let c = cfg();
    let (mut s, t0) = open(&c, false);
    s.on_event(t0, caps(&["heartbeat"]));
    // Established first: AppNotReady takes it back.
    let acts = s.on_event(t0 + S(1), recipe(1));
    assert!(acts.iter().any(|a| matches!(a, Action::Engine(ForEngine::Online(true)))), "{acts:?}");
    let t1 = t0 + S(2);
    let acts = s.on_event(t1, msg(r#"{"code":"AppNotReady"}"#));
    assert!(acts.iter().any(|a| matches!(a, Action::Engine(ForEngine::Online(false)))), "{acts:?}");
    let Some(delay) = acts.iter().find_map(|a| match a {
        Action::Status(StatusChange::AppNotReady { attempt: 1, delay }) => Some(*delay),
        _ => None,
    }) else {
        panic!("{acts:?}")
    };
    assert!(delay <= S(1), "the first pause is within the backoff's base: {delay:?}");
    assert!(sends(&acts).is_empty() && end(&acts).is_none(), "{acts:?}");
    // A second AppNotReady while one pause runs changes nothing.
    let again = s.on_event(t1, msg(r#"{"code":"AppNotReady"}"#));
    assert!(again.is_empty(), "{again:?}");
    // At the pause's end, the Handshake again, on this connection, and a new answer deadline.
    assert!(s.next_deadline() <= t1 + delay);
    let acts = s.on_event(t1 + delay, SessionEvent::Timer);
    assert!(matches!(sends(&acts)[..], [Outbound::Handshake { .. }]), "{acts:?}");
    // No heartbeat while not established.
    assert!(!acts.iter().any(|a| matches!(a, Action::Heartbeat { .. })), "{acts:?}");
    let acts = s.on_event(t1 + delay + c.answer_timeout, SessionEvent::Frame(Frame::Control));
    assert!(acts.is_empty());
    let acts = s.on_event(t1 + delay + c.answer_timeout, SessionEvent::Timer);
    assert!(matches!(end(&acts), Some(EndKind::Error(LinkError::NoAnswer { .. }))), "{acts:?}");
}

#[test]
fn consecutive_app_not_ready_answers_count_up() {
    let c = cfg();
    let (mut s, t0) = open(&c, false);
    let mut t = t0;
    for attempt in 1..=3 {
        let acts = s.on_event(t, msg(r#"{"code":"AppNotReady"}"#));
        let Some(delay) = acts.iter().find_map(|a| match a {
            Action::Status(StatusChange::AppNotReady { attempt: n, delay }) if *n == attempt => Some(*delay),
            _ => None,
        }) else {
            panic!("attempt {attempt}: {acts:?}")
        };
        t += delay;
        assert!(matches!(sends(&s.on_event(t, SessionEvent::Timer))[..], [Outbound::Handshake { .. }]));
    }
}

#[test]
fn a_run_of_bad_frames_logs_eight_then_sums_up_and_too_many_end_the_session() {
    let c = LinkConfig { max_bad_frames: 12, ..cfg() };
    let (mut s, t0) = open(&c, false);
    let bad = || SessionEvent::Frame(Frame::Bad(parse_inbound("not json").unwrap_err()));
    let mut logged = 0;
    let mut counted = 0;
    for i in 0..11 {
        let acts =
            if i % 2 == 0 { s.on_event(t0, bad()) } else { s.on_event(t0, SessionEvent::Frame(Frame::Binary(3))) };
        counted += acts.iter().filter(|a| matches!(a, Action::Status(StatusChange::Count(Counter::BadFrames)))).count();
        logged += notices(&acts).iter().filter(|n| matches!(n, Notice::BadFrame { .. })).count();
        assert!(end(&acts).is_none(), "frame {i}: {acts:?}");
    }
    assert_eq!((logged, counted), (MAX_BAD_LOGGED as usize, 11));
    // An unknown code neither breaks nor extends the run.
    s.on_event(t0, msg(r#"{"code":"Teleport"}"#));
    // A good frame ends it, said once with what was not logged.
    let acts = s.on_event(t0, caps(&[]));
    assert_eq!(notices(&acts)[0], &Notice::BadRunEnded { consecutive: 11, not_logged: 3 });
    // A new run starts from one.
    let acts = s.on_event(t0, bad());
    assert!(matches!(notices(&acts)[..], [Notice::BadFrame { consecutive: 1, .. }]), "{acts:?}");
    let acts = s.on_event(t0, caps(&[]));
    assert!(notices(&acts).iter().all(|n| !matches!(n, Notice::BadRunEnded { .. })), "all were logged: {acts:?}");
    // `max_bad_frames` in a row end the session.
    for _ in 1..12 {
        assert!(end(&s.on_event(t0, bad())).is_none());
    }
    let acts = s.on_event(t0, bad());
    assert!(matches!(end(&acts), Some(EndKind::Error(LinkError::TooManyBadFrames { count: 12, .. }))), "{acts:?}");
}

#[test]
fn an_unknown_code_is_logged_once_and_counted_every_time() {
    let (mut s, t0) = open(&cfg(), false);
    let unknown = |code: &str| msg(&format!(r#"{{"code":"{code}"}}"#));
    let mut logged = Vec::new();
    for code in ["Teleport", "Teleport", "Warp", "Teleport"] {
        let acts = s.on_event(t0, unknown(code));
        assert!(acts.iter().any(|a| matches!(a, Action::Status(StatusChange::Count(Counter::UnknownFrames)))));
        logged.extend(notices(&acts).into_iter().cloned());
    }
    assert_eq!(logged, vec![Notice::UnknownCode("Teleport".into()), Notice::UnknownCode("Warp".into())]);
    // At most MAX_UNKNOWN_LOGGED distinct codes per connection.
    let mut more = 0;
    for i in 0..20 {
        more += notices(&s.on_event(t0, unknown(&format!("Code{i}")))).len();
    }
    assert_eq!(more, MAX_UNKNOWN_LOGGED - 2);
    // An unknown code is no answer to the Handshake.
    let acts = s.on_event(t0 + cfg().answer_timeout, SessionEvent::Timer);
    assert!(matches!(end(&acts), Some(EndKind::Error(LinkError::NoAnswer { .. }))), "{acts:?}");
}

#[test]
fn statelogs_go_out_in_order_from_the_last_sent_once_established_and_acks_deliver_them() {
    let (mut s, t0) = open(&cfg(), false);
    s.on_event(t0, caps(&["statelog-ack"]));
    // Spooled before the session is established: kept for then.
    assert!(s.on_event(t0, SessionEvent::Spooled).is_empty());
    let acts = s.on_event(t0, recipe(1));
    // Online, the pending upgrade report, the recipe for the engine, then the StateLogs.
    assert!(matches!(acts[0], Action::Status(StatusChange::Connected)), "{acts:?}");
    assert_eq!(collects(&acts), vec![Collect::UpgradeReport, Collect::StateLogs { after: 0 }]);
    assert!(matches!(acts.last(), Some(Action::Collect(Collect::StateLogs { after: 0 }))), "{acts:?}");
    assert!(acts.iter().any(|a| matches!(a, Action::Engine(ForEngine::Recipe(r)) if r.recipe_version == 1)));

    let acts = s.on_event(t0, SessionEvent::Pending(vec![log(1), log(2)]));
    let seqs: Vec<_> =
        sends(&acts).iter().map(|m| if let Outbound::StateLog(l) = m { l.seq } else { panic!("{m:?}") }).collect();
    assert_eq!(seqs, vec![Some(1), Some(2)], "in order, with seq to a backend that acks");
    // Counted after each send; with acks the outbox keeps them until acknowledged.
    assert!(matches!(acts[1], Action::Status(StatusChange::Count(Counter::Sent))), "{acts:?}");
    assert!(!acts.iter().any(|a| matches!(a, Action::Delivered { .. })), "{acts:?}");
    // The next flush reads after the last one sent.
    let acts = s.on_event(t0, SessionEvent::Spooled);
    assert_eq!(collects(&acts), vec![Collect::StateLogs { after: 2 }]);
    let acts = s.on_event(t0, msg(r#"{"code":"StateLogAck","seq":2}"#));
    assert!(matches!(acts[..], [Action::Delivered { seq: 2, cumulative: true }]), "{acts:?}");
    // A second RecipeMetadata does not establish again (no re-sending from 0).
    let acts = s.on_event(t0, recipe(2));
    assert!(collects(&acts).is_empty(), "{acts:?}");
}

#[test]
fn a_v1_backend_gets_v1_statelogs_delivered_once_written_and_its_acks_are_ignored() {
    let (mut s, t0) = open(&cfg(), false);
    s.on_event(t0, recipe(1));
    let acts = s.on_event(t0, SessionEvent::Pending(vec![log(5)]));
    let [Outbound::StateLog(l)] = sends(&acts)[..] else { panic!("{acts:?}") };
    assert_eq!((l.seq, l.offline, l.ran_at.as_deref()), (None, false, None));
    assert!(matches!(acts.last(), Some(Action::Delivered { seq: 5, cumulative: false })), "{acts:?}");
    let acts = s.on_event(t0, msg(r#"{"code":"StateLogAck","seq":5}"#));
    assert!(matches!(notices(&acts)[..], [Notice::AckIgnored { seq: 5 }]), "{acts:?}");
}

#[test]
fn a_shutdown_flushes_from_the_last_sent_then_closes() {
    let (mut s, t0) = open(&cfg(), false);
    let acts = s.on_event(t0, SessionEvent::Shutdown);
    assert!(matches!(acts[..], [Action::Close(None), Action::End(EndKind::Shutdown)]), "not established: {acts:?}");
    let (mut s, t0) = open(&cfg(), false);
    s.on_event(t0, recipe(1));
    s.on_event(t0, SessionEvent::Pending(vec![log(1), log(2), log(3)]));
    s.on_event(t0, SessionEvent::Spooled);
    let acts = s.on_event(t0, SessionEvent::Shutdown);
    assert!(
        matches!(
            acts[..],
            [Action::FinalFlush { after: 3, within: FINAL_FLUSH }, Action::Close(None), Action::End(EndKind::Shutdown)]
        ),
        "{acts:?}"
    );
}

#[test]
fn pings_go_out_every_interval_and_two_silent_intervals_are_death() {
    let c = cfg();
    let (mut s, t0) = open(&c, false);
    s.on_event(t0, SessionEvent::Timer);
    s.on_event(t0, caps(&[]));
    assert_eq!(s.next_deadline(), t0 + S(1), "the next liveness tick");
    let acts = s.on_event(t0 + c.ping_interval, SessionEvent::Timer);
    assert!(acts.iter().any(|a| matches!(a, Action::Ping)), "{acts:?}");
    // A pong at 40 s: the connection is alive until 40 s + two intervals.
    let heard = t0 + S(40);
    s.on_event(heard, SessionEvent::Frame(Frame::Control));
    let dead_at = heard + c.ping_interval * 2;
    let mut t = heard;
    while t + S(1) < dead_at {
        t += S(1);
        assert!(end(&s.on_event(t, SessionEvent::Timer)).is_none(), "{t:?}");
    }
    assert!(s.next_deadline() <= dead_at);
    let acts = s.on_event(dead_at, SessionEvent::Timer);
    assert!(matches!(end(&acts), Some(EndKind::Error(LinkError::Dead { silent_s: 60, .. }))), "{acts:?}");
}

#[test]
fn a_second_fetch_logs_is_refused_while_one_is_answered() {
    let fetch = |r: &str| msg(&format!(r#"{{"code":"FetchLogs","request":"{r}","since":1}}"#));
    let (mut s, t0) = open(&cfg(), true);
    s.on_event(t0, caps(&["fetch-logs"]));
    let acts = s.on_event(t0, fetch("r1"));
    assert!(matches!(acts.last(), Some(Action::StartLogs(req)) if req.request == "r1"), "{acts:?}");
    let acts = s.on_event(t0, fetch("r2"));
    assert!(!acts.iter().any(|a| matches!(a, Action::StartLogs(_))), "{acts:?}");
    let [Outbound::Logs(no)] = sends(&acts)[..] else { panic!("{acts:?}") };
    assert_eq!(
        (no["request"].as_str(), no["error"].as_str()),
        (Some("r2"), Some("another log request is being answered"))
    );
    // The answer goes out in order; then the next request is taken.
    let frames = vec![serde_json::json!({"part": 1}), serde_json::json!({"part": 2})];
    let acts = s.on_event(t0, SessionEvent::LogsReady(Some(frames.clone())));
    assert_eq!(sends(&acts), frames.iter().cloned().map(Outbound::Logs).collect::<Vec<_>>().iter().collect::<Vec<_>>());
    assert!(matches!(notices(&acts)[..], [Notice::LogsSent { frames: 2 }]));
    assert!(matches!(s.on_event(t0, fetch("r3")).last(), Some(Action::StartLogs(_))));
    // A task that died without an answer frees the slot too.
    s.on_event(t0, SessionEvent::LogsReady(None));
    assert!(matches!(s.on_event(t0, fetch("r4")).last(), Some(Action::StartLogs(_))));
}

#[test]
fn fetch_logs_without_the_capability_is_ignored_and_said_once() {
    let fetch = msg(r#"{"code":"FetchLogs","request":"r","since":1}"#);
    let (mut s, t0) = open(&cfg(), true);
    // The backend did not announce fetch-logs.
    s.on_event(t0, caps(&[]));
    let acts = s.on_event(t0, fetch);
    assert!(matches!(acts[..], [Action::Notice(Notice::FetchLogsIgnored { .. })]), "{acts:?}");
    let acts = s.on_event(t0, msg(r#"{"code":"FetchLogs","request":"r","since":1}"#));
    assert!(acts.is_empty(), "{acts:?}");
}

#[test]
fn heartbeats_start_when_established_with_a_backend_that_announced_them() {
    let c = cfg();
    let (mut s, t0) = open(&c, false);
    s.on_event(t0, caps(&["heartbeat"]));
    s.on_event(t0 + S(5), recipe(1));
    let acts = s.on_event(t0 + S(5), SessionEvent::Timer);
    assert!(acts.iter().any(|a| matches!(a, Action::Heartbeat { connected_s: 0 })), "{acts:?}");
    let next = t0 + S(5) + c.heartbeat_interval;
    s.on_event(next - S(1), SessionEvent::Frame(Frame::Control));
    let acts = s.on_event(next, SessionEvent::Timer);
    assert!(acts.iter().any(|a| matches!(a, Action::Heartbeat { connected_s: 60 })), "{acts:?}");
}

#[test]
fn hints_end_the_session_only_from_a_backend_that_announced_them() {
    let (mut s, t0) = open(&cfg(), false);
    let acts = s.on_event(t0, msg(r#"{"code":"Reconnect","after_s":30}"#));
    assert!(matches!(acts[..], [Action::Notice(Notice::ReconnectIgnored { after_s: 30 })]), "{acts:?}");
    let close = || SessionEvent::Frame(Frame::Close(Some((1000, "reconnect after 30 s".into()))));
    let acts = s.on_event(t0, close());
    assert!(
        matches!(end(&acts), Some(EndKind::Error(LinkError::Closed { reason, .. })) if reason == " (1000 reconnect after 30 s)")
    );

    let (mut s, t0) = open(&cfg(), false);
    s.on_event(t0, caps(&["reconnect-hint"]));
    let acts = s.on_event(t0, close());
    assert!(matches!(end(&acts), Some(EndKind::Hint(d)) if *d == S(30)), "{acts:?}");
    let (mut s, t0) = open(&cfg(), false);
    s.on_event(t0, caps(&["reconnect-hint"]));
    let acts = s.on_event(t0, msg(r#"{"code":"Reconnect","after_s":7}"#));
    assert!(
        matches!(acts[..], [Action::Close(Some((CloseCode::Normal, "reconnect hint"))), Action::End(EndKind::Hint(d))] if d == S(7))
    );
}

#[test]
fn a_session_is_healthy_once_answered_and_up_long_enough() {
    let c = cfg();
    let (mut s, t0) = open(&c, false);
    assert!(!s.end(t0 + c.healthy_after, EndKind::TestDone).healthy, "never answered");
    s.on_event(t0, caps(&[]));
    assert!(!s.end(t0 + c.healthy_after - S(1), EndKind::TestDone).healthy);
    assert!(s.end(t0 + c.healthy_after, EndKind::TestDone).healthy);
}
