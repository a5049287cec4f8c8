//! Fan-out of VM events to every open `GET /v1/events` stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::types::Event;
use rvmm_devices::sync::MutexExt;

/// Events a subscriber may have unread before it is cut off as too slow.
pub const SUBSCRIBER_BACKLOG: usize = 256;

struct Subscriber {
    tx: SyncSender<Event>,
    lagged: Arc<AtomicBool>,
}

/// A receiver the bus hands every event to as it is published, under the bus's lock (so in
/// publication order); it must never block. The event log is one.
pub trait EventSink: Send + Sync {
    /// Takes `event`; must return at once.
    fn deliver(&self, event: &Event);
    /// The bus closed: no event follows.
    fn close(&self);
}

#[derive(Default)]
struct BusState {
    subscribers: Vec<Subscriber>,
    sinks: Vec<Arc<dyn EventSink>>,
    closed: bool,
}

/// Delivers every published [`Event`] to every live [`Subscription`], in publication order.
///
/// A subscription whose reader went away is dropped on the next publish; one that falls more
/// than [`SUBSCRIBER_BACKLOG`] events behind is cut off and marked lagged, so a stuck client
/// never holds memory or the publisher. [`EventBus::close`] ends every stream.
#[derive(Default)]
pub struct EventBus {
    state: Mutex<BusState>,
}

impl EventBus {
    /// An open bus without subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new stream of every event published from now on; already ended if the bus is closed.
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::sync_channel(SUBSCRIBER_BACKLOG);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut state = self.state.locked();
        if !state.closed {
            state.subscribers.push(Subscriber {
                tx,
                lagged: lagged.clone(),
            });
        }
        Subscription { rx, lagged }
    }

    /// Hands every event published from now on to `sink` until the bus closes (at once if it
    /// is closed already). Unlike a [`Subscription`], a sink is never cut off: it decides itself
    /// what to do when it cannot keep up.
    pub fn attach(&self, sink: Arc<dyn EventSink>) {
        let mut state = self.state.locked();
        if state.closed {
            sink.close();
        } else {
            state.sinks.push(sink);
        }
    }

    /// Sends `event` to every sink and subscriber; never blocks.
    pub fn publish(&self, event: Event) {
        let mut state = self.state.locked();
        for sink in &state.sinks {
            sink.deliver(&event);
        }
        state
            .subscribers
            .retain(|s| match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Disconnected(_)) => false,
                Err(TrySendError::Full(_)) => {
                    log::warn!(
                        "an events stream fell {SUBSCRIBER_BACKLOG} events behind; cutting it off"
                    );
                    s.lagged.store(true, Ordering::Release);
                    false
                }
            });
    }

    /// Ends every stream after the events already published; later subscriptions end at once.
    pub fn close(&self) {
        let mut state = self.state.locked();
        state.closed = true;
        state.subscribers.clear();
        for sink in state.sinks.drain(..) {
            sink.close();
        }
    }

    /// Number of live subscriptions (as of the last publish).
    pub fn subscriber_count(&self) -> usize {
        self.state.locked().subscribers.len()
    }
}

/// The receiving end of one events stream.
pub struct Subscription {
    rx: mpsc::Receiver<Event>,
    lagged: Arc<AtomicBool>,
}

/// What waiting on a [`Subscription`] gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// The next event.
    Event(Event),
    /// Nothing within the wait.
    Idle,
    /// The stream is over: the bus closed, or it cut this subscription off (see
    /// [`Subscription::lagged`]).
    Ended,
}

impl Subscription {
    /// Waits up to `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Received {
        match self.rx.recv_timeout(timeout) {
            Ok(event) => Received::Event(event),
            Err(RecvTimeoutError::Timeout) => Received::Idle,
            Err(RecvTimeoutError::Disconnected) => Received::Ended,
        }
    }

    /// Whether the bus cut this subscription off for falling behind (events were lost).
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{EventKind, ShutdownReason};

    const WAIT: Duration = Duration::from_millis(500);

    fn event(n: u64) -> Event {
        Event {
            timestamp_ms: n,
            kind: EventKind::VmShutdown {
                reason: ShutdownReason::PowerOff,
            },
        }
    }

    #[test]
    fn every_subscriber_gets_every_event_in_order() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        let b = bus.subscribe();
        bus.publish(event(1));
        bus.publish(event(2));
        for s in [&a, &b] {
            assert_eq!(s.recv_timeout(WAIT), Received::Event(event(1)));
            assert_eq!(s.recv_timeout(WAIT), Received::Event(event(2)));
        }
    }

    #[test]
    fn dropped_subscription_is_removed_on_publish() {
        let bus = EventBus::new();
        drop(bus.subscribe());
        bus.publish(event(1));
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[test]
    fn close_ends_streams_after_pending_events() {
        let bus = EventBus::new();
        let s = bus.subscribe();
        bus.publish(event(1));
        bus.close();
        assert_eq!(s.recv_timeout(WAIT), Received::Event(event(1)));
        assert_eq!(s.recv_timeout(WAIT), Received::Ended);
    }

    #[test]
    fn subscription_after_close_is_already_ended() {
        let bus = EventBus::new();
        bus.close();
        assert_eq!(bus.subscribe().recv_timeout(WAIT), Received::Ended);
    }

    #[test]
    fn subscriber_too_far_behind_is_cut_off_as_lagged() {
        let bus = EventBus::new();
        let s = bus.subscribe();
        for n in 0..=SUBSCRIBER_BACKLOG as u64 {
            bus.publish(event(n));
        }
        assert!(s.lagged());
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[derive(Default)]
    struct Recorder(Mutex<(Vec<u64>, bool)>);

    impl EventSink for Recorder {
        fn deliver(&self, event: &Event) {
            self.0.locked().0.push(event.timestamp_ms);
        }
        fn close(&self) {
            self.0.locked().1 = true;
        }
    }

    #[test]
    fn sink_gets_every_event_in_order_and_is_never_cut_off_then_closed() {
        let bus = EventBus::new();
        let sink = Arc::new(Recorder::default());
        bus.attach(sink.clone());
        let count = SUBSCRIBER_BACKLOG as u64 * 2;

        for n in 0..count {
            bus.publish(event(n));
        }
        bus.close();

        let (seen, closed) = &*sink.0.locked();
        assert_eq!(seen, &(0..count).collect::<Vec<_>>());
        assert!(closed);
    }

    #[test]
    fn sink_attached_after_close_is_closed_at_once() {
        let bus = EventBus::new();
        bus.close();
        let sink = Arc::new(Recorder::default());

        bus.attach(sink.clone());

        assert!(sink.0.locked().1);
    }

    #[test]
    fn idle_subscription_reports_idle() {
        let bus = EventBus::new();
        let s = bus.subscribe();
        assert_eq!(s.recv_timeout(Duration::from_millis(1)), Received::Idle);
    }
}
