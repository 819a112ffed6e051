//! The round engine's own overhead per state: a full round of N states against a helper
//! that answers at once, so what is measured is the engine (ordering, status updates,
//! StateLog building, the effects call), not any state's work.
//!
//! `cargo bench --bench engine`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use opsagent::helper_client::{Cancel, HelperClient, HelperClientError, SignedState};
use opsagent::protocol::StateLog;
use opsagent::recipe::Recipe;
use opsagent::round::{Effects, Engine, EngineConfig, Event, Snapshot, UpdateOrder};
use opsagent_proto::request::{ApplyRequest, Change, HelperStatus, Outcome};
use serde_json::json;
use tokio::sync::Notify;

#[derive(Clone)]
struct InstantHelper;

impl HelperClient for InstantHelper {
    async fn apply(&self, req: ApplyRequest, _cancel: Cancel) -> Result<Outcome, HelperClientError> {
        Ok(Outcome { changes: vec![Change::new(req.state_id.as_str(), "checked")], ..Outcome::ok("already as wanted") })
    }
    async fn apply_signed(
        &self,
        req: ApplyRequest,
        _: SignedState,
        cancel: Cancel,
    ) -> Result<Outcome, HelperClientError> {
        self.apply(req, cancel).await
    }
    async fn status(&self) -> Result<HelperStatus, HelperClientError> {
        Ok(HelperStatus {
            helper_version: "bench".into(),
            protocol_version: 1,
            uptime_s: 0,
            running: vec![],
            recipes_verified: false,
            verified_version: None,
        })
    }
}

struct Counting {
    reported: Arc<AtomicUsize>,
    target: usize,
    done: Arc<Notify>,
}

impl Effects for Counting {
    async fn report(&mut self, log: StateLog) {
        std::hint::black_box(&log);
        if self.reported.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
    }
    async fn persist(&mut self, _snapshot: &Snapshot) {}
    async fn upgrade(&mut self, _order: &UpdateOrder) {}
    async fn drift(&mut self, _report: opsagent::round::DriftReport) {}
}

fn recipe(n: usize) -> Arc<Recipe> {
    let states: Vec<_> = (0..n)
        .map(|i| {
            json!({"id": format!("state-{i}"), "module": "linux.file",
                        "parameter": {"path": format!("/srv/app/conf-{i}"), "content": "x = 1\n", "mode": "0644"}})
        })
        .collect();
    Arc::new(Recipe::from_document(&json!({"recipe_version": 1, "state": states})).expect("valid recipe"))
}

fn rounds(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("engine_round");
    for n in [100usize, 1_000, 10_000] {
        let r = recipe(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += rt.block_on(async {
                        let done = Arc::new(Notify::new());
                        let effects = Counting { reported: Arc::default(), target: n, done: done.clone() };
                        let cfg = EngineConfig { round_delay: Duration::from_secs(3600), ..EngineConfig::default() };
                        let (engine, handle) = Engine::new(InstantHelper, effects, cfg, None);
                        let task = tokio::spawn(engine.run());
                        let start = tokio::time::Instant::now();
                        handle.events.send(Event::Recipe(r.clone())).await.expect("engine runs");
                        done.notified().await;
                        let spent = start.elapsed();
                        task.abort();
                        spent
                    });
                }
                total
            })
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let states: Vec<_> = (0..10_000)
        .map(|i| {
            json!({"id": format!("state-{i}"), "module": "linux.file",
                        "parameter": {"path": format!("/srv/app/conf-{i}"), "content": "x = 1\n", "mode": "0644"}})
        })
        .collect();
    let text = json!({"code": "RecipeMetadata", "recipe_version": 7, "state": states}).to_string();
    c.bench_function("parse_and_validate_10000_state_recipe", |b| {
        b.iter(|| {
            let Ok(opsagent::protocol::Inbound::RecipeMetadata(m)) = opsagent::protocol::parse_inbound(&text) else {
                panic!("parses")
            };
            let r = Recipe::from_wire(m.recipe_version, m.module, m.states.expect("states"), None).expect("valid");
            // Typing is done at each state's turn; this bench still measures it.
            for s in &r.states {
                std::hint::black_box(s.typed().is_ok());
            }
            std::hint::black_box(r);
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(5));
    targets = rounds, parse
}
criterion_main!(benches);
