//! The worker's life: connect (`work` and `ctl`), register, then claim → compute → write, one
//! transaction per batch on `work`, while the heartbeat thread reports on `ctl`. A connection
//! lost (either), a server restart, `pg_terminate_backend`, the lease's idle timeout: both
//! connections dropped, reconnected with backoff (1 s doubling to 30 s), registered again (fresh
//! settings). Only a role that may not be a worker (42501 from register) ends it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Client;
use postgres_openssl::MakeTlsConnector;

use crate::api::{self, Failure};
use crate::args::ProviderArg;
use crate::backoff::Backoff;
use crate::batch::{self, Stopped};
use crate::health::Health;
use crate::heartbeat::{Heartbeat, Rate, Report};
use crate::log;
use crate::models::{Got, ModelError, ModelSpec, Models};
use crate::pathmap::PathMap;
use crate::settings::{self, Settings};
use crate::shutdown::Shutdown;
use crate::skip::{Skip, BATCH_SKIP, MODEL_SKIP, STALL_SKIP};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Claims failing in a row (not for a table's sake) after which the worker connects and
/// registers again.
const CLAIMS_FAILED_RECONNECT: u32 = 3;

/// How long past the lease (the `statement_timeout` of `work`) a claim or write may run before
/// the watchdog ends its server process (owner code that swallows the cancel).
const WATCHDOG_GRACE: Duration = Duration::from_secs(10);

/// What the command line decided about the work.
pub struct Plan {
    /// Shown as host in doppler.workers.
    pub name: String,
    pub provider: ProviderArg,
    pub once: bool,
    /// Rows per claim (the most; see [`Worker::adapt`]).
    pub batch: i32,
    pub decode_threads: usize,
    pub poll_interval: Duration,
    pub paths: PathMap,
    /// What this host allows whatever the server says (`--file-root`, `--url-allowed-network`).
    pub caps: settings::Caps,
}

/// How the worker ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by a signal, or `--once` found nothing more to do.
    Clean,
    /// The role may not act as a worker (exit 2).
    NotPermitted(String),
}

/// Where the server is.
pub struct Server {
    pub config: postgres::Config,
    pub tls: MakeTlsConnector,
    /// For log lines (no password).
    pub described: String,
}

/// A registered worker's connections and settings.
struct Session {
    id: i64,
    work: Client,
    /// The server process of `work`.
    work_pid: i32,
    hb: Heartbeat,
    settings: Settings,
}

/// Why a session ended.
enum Ended {
    /// Stop: the worker exits.
    Exit,
    /// Connect and register again.
    Reconnect(String),
}

/// What one turn of the loop did.
enum Step {
    /// The claim returned no rows.
    Empty,
    /// The claim returned only rows of a table passed over (its oid unknown): given back.
    Skipped,
    /// A batch written; how long it took.
    Done(Duration),
    /// A second signal: the batch in hand rolled back.
    Aborted,
}

/// Why a batch failed (its transaction rolled back).
struct BatchError {
    event: &'static str,
    cause: Cause,
    table: Option<String>,
    /// Pass the table over for this long.
    skip: Option<Duration>,
    /// How long the batch had run.
    elapsed: Duration,
}

enum Cause {
    Sql(postgres::Error),
    Model(Box<ModelError>),
    Panic(String),
}

/// The worker's own totals, for heartbeats.
struct Totals {
    rows_done: i64,
    rows_failed: i64,
    rate: Rate,
    last_error: Option<String>,
}

pub struct Worker {
    plan: Plan,
    server: Server,
    shutdown: Arc<Shutdown>,
    health: Arc<Health>,
    models: Models,
    skip: Skip,
    totals: Totals,
    /// Rows per claim now: `plan.batch`, less while batches come near the lease.
    batch_size: i32,
    idle: Backoff,
}

impl Worker {
    pub fn new(
        plan: Plan,
        server: Server,
        models: Models,
        shutdown: Arc<Shutdown>,
        health: Arc<Health>,
    ) -> Worker {
        let idle = Backoff::new(plan.poll_interval, plan.poll_interval * 10);
        Worker {
            batch_size: plan.batch,
            plan,
            server,
            shutdown,
            health,
            models,
            skip: Skip::default(),
            totals: Totals {
                rows_done: 0,
                rows_failed: 0,
                rate: Rate::new(Instant::now()),
                last_error: None,
            },
            idle,
        }
    }

    /// Runs until stopped.
    pub fn run(&mut self) -> Exit {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            if self.shutdown.requested() {
                return Exit::Clean;
            }
            match self.connect() {
                Ok(session) => {
                    backoff.reset();
                    match self.serve(session) {
                        Ended::Exit => return Exit::Clean,
                        Ended::Reconnect(why) => {
                            let wait = backoff.next();
                            log::warning("reconnecting")
                                .field("reason", why)
                                .seconds("in_s", wait)
                                .emit();
                            if self.shutdown.wait(wait) {
                                return Exit::Clean;
                            }
                        }
                    }
                }
                Err(Connect::NotPermitted(m)) => return Exit::NotPermitted(m),
                Err(Connect::Retry) => {
                    if self.shutdown.wait(backoff.next()) {
                        return Exit::Clean;
                    }
                }
            }
        }
    }

    /// Both connections, the registration, the heartbeat.
    fn connect(&mut self) -> Result<Session, Connect> {
        let failed = |event: &str, e: &postgres::Error| {
            log::error(event)
                .field("server", self.server.described.clone())
                .field("error", api::describe(e))
                .field("sqlstate", api::sqlstate(e))
                .emit();
            Connect::Retry
        };
        let mut work = self
            .server
            .config
            .connect(self.server.tls.clone())
            .map_err(|e| failed("connect_failed", &e))?;
        let work_pid = api::backend_pid(&mut work).map_err(|e| failed("connect_failed", &e))?;
        let mut ctl = self
            .server
            .config
            .connect(self.server.tls.clone())
            .map_err(|e| failed("connect_failed", &e))?;
        let reg = match api::register(
            &mut ctl,
            &self.plan.name,
            std::process::id() as i32,
            self.plan.provider.as_str(),
            VERSION,
        ) {
            Ok(r) => r,
            Err(e) if api::classify(&e, ctl.is_closed()) == Failure::NotPermitted => {
                let m = api::describe(&e);
                log::error("register_refused")
                    .field("error", m.clone())
                    .field("sqlstate", api::sqlstate(&e))
                    .emit();
                return Err(Connect::NotPermitted(format!(
                    "{m} (the worker's role must be a member of doppler_worker: GRANT doppler_worker TO <role>)"
                )));
            }
            Err(e) => return Err(failed("register_failed", &e)),
        };
        let settings = match settings::parse(&reg.settings, &self.plan.paths, &self.plan.caps) {
            Ok(s) => s,
            Err(m) => {
                log::error("register_failed")
                    .field("error", m)
                    .field("sqlstate", serde_json::Value::Null)
                    .emit();
                let _ = api::unregister(&mut ctl, reg.id);
                return Err(Connect::Retry);
            }
        };
        // the owner's code in a claim or write (a policy, a trigger) may sleep: a statement ends
        // within the lease, or the watchdog ends it (see Heartbeat::watch)
        if let Err(e) = api::set_statement_timeout(&mut work, settings.lease) {
            let _ = api::unregister(&mut ctl, reg.id);
            return Err(failed("connect_failed", &e));
        }
        if !settings.bad_networks.is_empty() {
            log::warning("settings")
                .field("worker", reg.id)
                .field(
                    "error",
                    format!(
                        "url.allowed_networks entries that are not networks are ignored: {}",
                        settings.bad_networks.join(", ")
                    ),
                )
                .emit();
        }
        let hb = match Heartbeat::start(ctl, reg.id, settings.heartbeat, self.report()) {
            Ok(hb) => hb,
            Err(e) => {
                log::error("heartbeat_failed")
                    .field("error", e.to_string())
                    .emit();
                return Err(Connect::Retry);
            }
        };
        log::info("registered")
            .field("worker", reg.id)
            .field("name", self.plan.name.clone())
            .field("server", self.server.described.clone())
            .field("provider", self.plan.provider.as_str())
            .field("version", VERSION)
            .field("allow_urls", settings.policy.urls.is_some())
            .field("file_roots", settings.policy.file_roots.clone())
            .seconds("heartbeat_s", settings.heartbeat)
            .seconds("lease_s", settings.lease)
            .emit();
        self.health.ready(true);
        Ok(Session {
            id: reg.id,
            work,
            work_pid,
            hb,
            settings,
        })
    }

    /// Claims and fills until stopped or a connection is lost.
    fn serve(&mut self, mut s: Session) -> Ended {
        self.idle.reset();
        self.health.idle_wait(self.idle.peek());
        // claims that failed in a row (the session may be what is wrong: registering again is cheap)
        let mut claims_failed = 0;
        loop {
            if let Some((_, why)) = s.hb.lost() {
                return self.drop_session(s, why);
            }
            if self.shutdown.requested() {
                self.finish(s);
                return Ended::Exit;
            }
            let step = self.batch(&mut s);
            match &step {
                Err(e) if e.event == "claim_failed" => claims_failed += 1,
                _ => claims_failed = 0,
            }
            let wait = match step {
                Ok(Step::Done(took)) => {
                    self.health.progress(Some(took));
                    self.idle.reset();
                    self.health.idle_wait(self.idle.peek());
                    continue;
                }
                Ok(Step::Aborted) => {
                    log::info("batch_rolled_back")
                        .field("worker", s.id)
                        .field(
                            "reason",
                            "a second stop signal: the rows go back to the queue",
                        )
                        .emit();
                    self.finish(s);
                    return Ended::Exit;
                }
                Ok(Step::Empty | Step::Skipped) => {
                    if self.plan.once {
                        log::info("done")
                            .field("worker", s.id)
                            .field("rows_done", self.totals.rows_done)
                            .field("rows_failed", self.totals.rows_failed)
                            .emit();
                        self.finish(s);
                        return Ended::Exit;
                    }
                    self.idle.next()
                }
                Err(e) => {
                    let skipped = e.skip.is_some() && e.table.is_some();
                    if let Some(why) = self.failed(&mut s, e) {
                        return self.drop_session(s, why);
                    }
                    if claims_failed >= CLAIMS_FAILED_RECONNECT {
                        let why =
                            format!("{claims_failed} claims failed in a row: registering again");
                        return self.drop_session(s, why);
                    }
                    if skipped {
                        // (other tables may have rows: claim again at once)
                        continue;
                    }
                    self.idle.next()
                }
            };
            // (the health check allows for the wait; a stop request ends it early)
            self.health.idle_wait(wait);
            self.shutdown.wait(wait);
        }
    }

    /// One claim and, when it returned rows, their batch, in one transaction.
    fn batch(&mut self, s: &mut Session) -> Result<Step, BatchError> {
        let started = Instant::now();
        let sql = |event: &'static str, table: Option<String>, skip: Option<Duration>| {
            move |e: postgres::Error| BatchError {
                event,
                cause: Cause::Sql(e),
                table,
                skip,
                elapsed: started.elapsed(),
            }
        };
        for tbl in self.skip.unresolved() {
            match api::table_oid(&mut s.work, &tbl) {
                Ok(oid) => self.skip.resolve(&tbl, oid),
                Err(e) => return Err(sql("claim_failed", None, None)(e)),
            }
        }
        let oids = self.skip.oids(started);
        let watchdog = s.settings.lease + WATCHDOG_GRACE;
        let mut tx = s
            .work
            .transaction()
            .map_err(sql("claim_failed", None, None))?;
        let rows = {
            let _watch = s.hb.watch(s.work_pid, watchdog);
            api::claim(&mut tx, s.id, self.batch_size, &oids).map_err(sql(
                "claim_failed",
                None,
                None,
            ))?
        };
        self.health.progress(None);
        let Some(first) = rows.first() else {
            tx.commit().map_err(sql("claim_failed", None, None))?;
            return Ok(Step::Empty);
        };
        let tbl = first.tbl.clone();
        if self.skip.contains(&tbl, Instant::now()) {
            // (dropping the transaction rolls it back: the rows go back to the queue)
            return Ok(Step::Skipped);
        }
        let claimed = rows.len() as i64;
        s.hb.update(true, |r| {
            r.holding_table = Some(tbl.clone());
            r.holding_rows = claimed;
        });
        let model_failed = |e: ModelError| BatchError {
            event: "model_unusable",
            cause: Cause::Model(Box::new(e)),
            table: Some(tbl.clone()),
            skip: Some(MODEL_SKIP),
            elapsed: started.elapsed(),
        };
        let spec = ModelSpec::parse(&first.model).map_err(model_failed)?;
        let pre = spec.preprocess().map_err(model_failed)?;
        let loaded = match self.models.get(&spec).map_err(model_failed)? {
            Got::Cached(l) => l,
            Got::Loaded(l) => {
                let mut line = log::info("model_loaded")
                    .field("tag", l.tag.clone())
                    .field("path", l.path.clone())
                    .field("sha256", l.sha256.clone())
                    .field("provider", l.model.provider)
                    .field("input_size", l.model.input_size)
                    .field("dim", l.model.dim);
                if let Some(why) = &l.model.fallback {
                    line = line.field("cuda_unavailable", why.clone());
                }
                line.emit();
                if let (Some(why), ProviderArg::Cuda) = (&l.model.fallback, self.plan.provider) {
                    log::warning("cuda_unavailable")
                        .field("tag", l.tag.clone())
                        .field(
                            "error",
                            format!("--provider cuda, but the model runs on the CPU: {why}"),
                        )
                        .emit();
                }
                l
            }
        };
        let sha256 = loaded.sha256.clone();
        let opts = batch::Options {
            decode_threads: self.plan.decode_threads,
            want_hash: spec.want_hash,
            want_pdq: spec.want_pdq,
            settings: &s.settings,
            paths: &self.plan.paths,
        };
        let shutdown = Arc::clone(&self.shutdown);
        let computing = Instant::now();
        let out = match batch::run(&rows, &mut loaded.model, &pre, &opts, &move || {
            shutdown.aborted()
        }) {
            Ok(out) => out,
            Err(Stopped::Aborted) => return Ok(Step::Aborted),
            Err(Stopped::Panicked(m)) => {
                // (the session may be in any state: load it afresh next time)
                self.models.forget(&spec.tag);
                return Err(BatchError {
                    event: "batch_panicked",
                    cause: Cause::Panic(m),
                    table: Some(tbl.clone()),
                    skip: Some(BATCH_SKIP),
                    elapsed: started.elapsed(),
                });
            }
        };
        let computed = computing.elapsed();
        let watch = s.hb.watch(s.work_pid, watchdog);
        let written = api::write(
            &mut tx,
            s.id,
            &sha256,
            &out.n,
            &out.vectors,
            &out.hashes,
            spec.want_pdq
                .then_some((&out.pdq[..], &out.pdq_quality[..])),
            &out.failures_json(),
        )
        .map_err(sql("write_failed", Some(tbl.clone()), Some(BATCH_SKIP)))?;
        tx.commit()
            .map_err(sql("commit_failed", Some(tbl.clone()), Some(BATCH_SKIP)))?;
        drop(watch);
        let took = started.elapsed();
        let failed = out.failures.len() as i64;
        let now = Instant::now();
        self.totals.rows_done += written;
        self.totals.rows_failed += failed;
        self.totals.rate.add(now, claimed as u64);
        log::info("batch")
            .field("worker", s.id)
            .field("table", tbl.clone())
            .field("model", spec.tag.clone())
            .field("rows", claimed)
            .field("filled", written)
            .field("failed", failed)
            .seconds("seconds", took)
            .field(
                "rate",
                log::round3(claimed as f64 / took.as_secs_f64().max(1e-6)),
            )
            .seconds("fetch_s", out.stream.fetch)
            .seconds("infer_s", out.infer)
            .seconds("wait_s", out.stream.waited)
            .seconds("decode_s", out.stream.decode + out.stream.resize)
            .seconds("compute_s", computed)
            .emit();
        let report = self.report();
        s.hb.update(true, |r| *r = report);
        self.adapt(claimed, took, s.settings.lease);
        Ok(Step::Done(took))
    }

    /// Keeps batches well within the lease: the server ends a connection that stays idle in its
    /// transaction longer than `doppler.worker_lease`, and the worker's compute is that idle time.
    /// A batch that took over half the lease halves the claim; one under an eighth doubles it
    /// again, up to `--batch`.
    fn adapt(&mut self, rows: i64, took: Duration, lease: Duration) {
        let before = self.batch_size;
        if took > lease / 2 && self.batch_size > 1 {
            self.batch_size = ((rows as i32).min(self.batch_size) / 2).max(1);
        } else if took < lease / 8 && rows >= self.batch_size as i64 {
            self.batch_size = (self.batch_size * 2).min(self.plan.batch);
        }
        if self.batch_size != before {
            log::info("batch_size")
                .field("rows", self.batch_size)
                .field("was", before)
                .seconds("last_batch_s", took)
                .seconds("lease_s", lease)
                .emit();
        }
    }

    /// Records a failed batch (log, heartbeat, skip list); Some(reason) when the session must
    /// be dropped.
    fn failed(&mut self, s: &mut Session, e: BatchError) -> Option<String> {
        let closed = s.work.is_closed();
        let (failure, message, sqlstate) = match &e.cause {
            Cause::Sql(pe) => (
                api::classify(pe, closed),
                api::describe(pe),
                api::sqlstate(pe).map(str::to_string),
            ),
            Cause::Model(m) => (Failure::Other, m.to_string(), None),
            Cause::Panic(m) => (
                Failure::Other,
                format!("internal error in the batch: {m}"),
                None,
            ),
        };
        // a statement the owner's code kept from ending: cancelled by statement_timeout, or its
        // process ended by the watchdog
        let overran = sqlstate.as_deref() == Some("57014")
            || (failure == Failure::Connection && s.hb.terminated_work());
        log::error(e.event)
            .field("worker", s.id)
            .field("table", e.table.clone())
            .field("error", message.clone())
            .field("sqlstate", sqlstate)
            .seconds("seconds", e.elapsed)
            .emit();
        self.totals.last_error = Some(message.clone());
        let report = self.report();
        s.hb.update(true, |r| *r = report);
        let skip = match (&e.table, e.skip) {
            (Some(tbl), _) if overran => Some((tbl, STALL_SKIP)),
            (Some(tbl), Some(d)) => Some((tbl, d)),
            _ => None,
        };
        match failure {
            Failure::Connection => {
                if let Some((tbl, d)) = skip.filter(|_| overran) {
                    // (its oid looked up on the next connection)
                    self.pass_over(s.id, tbl, None, d);
                } else if e.elapsed >= s.settings.lease.mul_f64(0.9) {
                    // most likely the lease's idle timeout, the batch having run that long
                    self.adapt(self.batch_size as i64, e.elapsed, s.settings.lease);
                }
                return Some(message);
            }
            Failure::Unregistered => return Some(message),
            Failure::NotPermitted | Failure::Other => {}
        }
        if let Some((tbl, d)) = skip {
            let oid = match api::table_oid(&mut s.work, tbl) {
                Ok(oid) => oid,
                Err(pe) => {
                    log::error("skip_lookup_failed")
                        .field("table", tbl.clone())
                        .field("error", api::describe(&pe))
                        .field("sqlstate", api::sqlstate(&pe))
                        .emit();
                    None
                }
            };
            self.pass_over(s.id, tbl, oid, d);
        }
        None
    }

    /// Passes table `tbl` over for `d`.
    fn pass_over(&mut self, worker: i64, tbl: &str, oid: Option<u32>, d: Duration) {
        log::info("table_passed_over")
            .field("worker", worker)
            .field("table", tbl)
            .seconds("for_s", d)
            .emit();
        self.skip.add(tbl, oid, Instant::now(), d);
    }

    /// The heartbeat's report of the worker's totals (holding nothing).
    fn report(&mut self) -> Report {
        Report {
            holding_table: None,
            holding_rows: 0,
            rows_done: self.totals.rows_done,
            rows_failed: self.totals.rows_failed,
            rate: self.totals.rate.per_second(Instant::now()),
            last_error: self.totals.last_error.clone(),
        }
    }

    /// A session given up (lost connection): both connections dropped; the registration
    /// forgotten on the server when `ctl` still answers.
    fn drop_session(&mut self, s: Session, why: String) -> Ended {
        self.health.ready(false);
        let Session { id, work, hb, .. } = s;
        drop(work);
        if let Some(mut ctl) = hb.stop(Duration::from_secs(1)) {
            let _ = api::unregister(&mut ctl, id);
        }
        Ended::Reconnect(why)
    }

    /// A clean end: the heartbeat stopped, the worker unregistered.
    fn finish(&mut self, s: Session) {
        self.health.ready(false);
        let Session { id, work, hb, .. } = s;
        drop(work);
        match hb.stop(Duration::from_secs(5)) {
            Some(mut ctl) => match api::unregister(&mut ctl, id) {
                Ok(()) => log::info("unregistered").field("worker", id).emit(),
                Err(e) => log::error("unregister_failed")
                    .field("worker", id)
                    .field("error", api::describe(&e))
                    .field("sqlstate", api::sqlstate(&e))
                    .emit(),
            },
            None => log::warning("unregister_failed")
                .field("worker", id)
                .field("error", "the control connection is gone")
                .emit(),
        }
    }
}

/// Why connecting failed.
enum Connect {
    /// Logged; try again after the backoff.
    Retry,
    NotPermitted(String),
}
