//! The core's event loop: it feeds the core its events in batches, with the store
//! writer's reports read first, and routes what each batch produced.

use super::*;

/// Starts the core loop and the store writer; returns the sender that feeds the core.
pub fn start_core(
    core: Core,
    store: Store,
    low_space_bytes: u64,
) -> std::io::Result<(mpsc::Sender<Inbound>, tokio::task::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Inbound>(CORE_EVENTS_QUEUE_MAX);
    // Room for every request the core may have in flight: it never waits on the store.
    let (store_tx, store_rx) = mpsc::channel(limits::HEAD_STORE_REQUESTS_MAX);
    // The writer's reports on their own channel, which the loop reads before any other.
    let (report_tx, reports) = mpsc::channel(limits::HEAD_WRITER_REPORTS_MAX);
    tokio::spawn(measure_free_space(
        store.dir().to_path_buf(),
        low_space_bytes,
        tx.clone(),
    ));
    crate::store::spawn_writer(store, store_rx, move |report| {
        let event = match report {
            WriterEvent::Committed { tokens, result } => Event::Committed { tokens, result },
            WriterEvent::Faulted(fault) => Event::StorageFaulted { fault },
            WriterEvent::Recovered => Event::StorageRecovered,
        };
        // The loop reads these first, so this wait is short; if the loop is gone the head
        // is shutting down and there is nobody left to tell.
        let _ = report_tx.blocking_send(event);
    })?;
    let core_loop = CoreLoop {
        core,
        router: Router::new(store_tx),
        events: Vec::new(),
    };
    let handle = tokio::spawn(core_loop.run(rx, reports));
    core_flush_initial(&tx);
    Ok((tx, handle))
}

/// The core and the router of its outputs, in one task.
struct CoreLoop {
    core: Core,
    router: Router,
    /// The events one inbound message makes (reused).
    events: Vec<Event>,
}

/// What starts a turn of the loop.
enum Turn {
    Report(Event),
    Inbound(Inbound),
    Tick,
}

impl CoreLoop {
    /// Turns until every sender of `inbound` is gone: each turn takes the store writer's
    /// reports first (commit completions must not wait behind up to
    /// [`CORE_EVENTS_QUEUE_MAX`] client and node events), then up to
    /// [`CORE_EVENTS_PER_BATCH_MAX`] events in all, ends the batch, and routes what the
    /// core produced. Outputs are routed after every event, as the core produces them, so
    /// an answer does not wait for the rest of its batch.
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut reports: mpsc::Receiver<Event>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cadence = StallMeter::new(std::time::Instant::now(), now_ms());
        loop {
            let first = match self.router.unsent_commit() {
                Some(report) => Turn::Report(report),
                // Reports, then the tick (at most one per `TICK`, so it cannot starve the
                // rest), then clients and nodes.
                None => tokio::select! {
                    biased;
                    Some(report) = reports.recv() => Turn::Report(report),
                    _ = tick.tick() => Turn::Tick,
                    ev = inbound.recv() => match ev {
                        Some(ev) => Turn::Inbound(ev),
                        None => break,
                    },
                },
            };
            let now = now_ms();
            if let Some(stalled_ms) = cadence.turn(std::time::Instant::now(), now) {
                self.apply(Event::Stalled { stalled_ms }, now);
            }
            match first {
                Turn::Report(event) => self.apply(event, now),
                Turn::Inbound(inbound) => self.take(inbound, now),
                Turn::Tick => self.apply(Event::Tick, now),
            }
            let mut n = 1;
            while let Some(report) = self
                .router
                .unsent_commit()
                .or_else(|| reports.try_recv().ok())
            {
                self.apply(report, now);
                n += 1;
            }
            while n < CORE_EVENTS_PER_BATCH_MAX {
                match inbound.try_recv() {
                    Ok(ev) => self.take(ev, now),
                    Err(_) => break,
                }
                n += 1;
            }
            self.core.end_batch(now);
            self.router.route(self.core.outputs());
        }
    }

    fn take(&mut self, inbound: Inbound, now: u64) {
        let mut events = std::mem::take(&mut self.events);
        self.router.take(inbound, &mut events);
        for event in events.drain(..) {
            self.apply(event, now);
        }
        self.events = events;
    }

    fn apply(&mut self, event: Event, now: u64) {
        self.core.handle(event, now);
        self.router.route(self.core.outputs());
    }
}

/// Measures the gaps between turns of the core's loop, which turns at least every
/// [`TICK`] while the head runs. Both clocks are read: the monotonic one sees a stop
/// signal or a starved process, the wall clock (which the core's deadlines use) also a
/// frozen VM, whose monotonic clock stands still, and a clock stepped forward.
#[derive(Debug)]
pub(super) struct StallMeter {
    last: std::time::Instant,
    last_wall_ms: u64,
}

impl StallMeter {
    pub(super) fn new(now: std::time::Instant, now_wall_ms: u64) -> StallMeter {
        StallMeter {
            last: now,
            last_wall_ms: now_wall_ms,
        }
    }

    /// A turn of the loop at `now`: how long the head did not run before it, in ms, when
    /// that is at least [`HEAD_STALL_MIN`] beyond the loop's cadence.
    pub(super) fn turn(&mut self, now: std::time::Instant, now_wall_ms: u64) -> Option<u64> {
        let mono_ms = now.saturating_duration_since(self.last).as_millis() as u64;
        let wall_ms = now_wall_ms.saturating_sub(self.last_wall_ms);
        self.last = now;
        self.last_wall_ms = now_wall_ms;
        let gap_ms = mono_ms.max(wall_ms);
        let cadence_ms = TICK.as_millis() as u64;
        let stalled_ms = gap_ms.saturating_sub(cadence_ms);
        (stalled_ms >= HEAD_STALL_MIN.as_millis() as u64).then_some(stalled_ms)
    }
}

/// Reads the data directory's free space every
/// [`crate::storage_fault::FREE_SPACE_CHECK_INTERVAL_MS`] and tells the core, until the
/// core is gone.
pub(super) async fn measure_free_space(
    dir: std::path::PathBuf,
    low_bytes: u64,
    events: mpsc::Sender<Inbound>,
) {
    use crate::storage_fault::{free_space, DiskSpace, FREE_SPACE_CHECK_INTERVAL_MS};
    let mut every = tokio::time::interval(std::time::Duration::from_millis(
        FREE_SPACE_CHECK_INTERVAL_MS,
    ));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = false;
    loop {
        every.tick().await;
        match free_space(&dir) {
            Ok((free_bytes, total_bytes)) => {
                failed = false;
                let space = DiskSpace {
                    free_bytes,
                    total_bytes,
                    low_bytes,
                };
                if events
                    .send(Inbound::Event(Event::DiskSpace(space)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                if !failed {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the data directory's free space");
                }
                failed = true;
            }
        }
    }
}

pub(super) fn core_flush_initial(tx: &mpsc::Sender<Inbound>) {
    // A first tick makes the core persist start-up changes (the built-in application).
    let _ = tx.try_send(Inbound::Event(Event::Tick));
}
