//! Watches that outlive broken streams and compactions: the crate reconnects neither.

use std::time::Instant;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use crate::store::{KeyValue, Revision, WatchEvent};

use super::client::{timeout_error, Core};
use super::error::is_compacted;
use super::retry::{Backoff, Outage, BACKOFF_MAX};
use super::REQUEST_TIMEOUT;

enum WatchEnd {
    ReceiverGone,
    Compacted,
    Broken(String),
}

/// Feeds one watch receiver for as long as it exists, across broken streams and compactions.
pub(super) async fn watch_loop(
    core: Core,
    prefix: String,
    mut next: Revision,
    tx: mpsc::Sender<WatchEvent>,
) {
    let mut backoff = Backoff::new();
    let mut outage = Outage::new(format!("watch {}{prefix}", core.prefix));
    outage.since = Some(core.watch_down_since.clone());
    loop {
        let end = tokio::select! {
            _ = tx.closed() => return,
            end = watch_stream(&core, &prefix, &mut next, &tx, &mut backoff, &mut outage) => end,
        };
        match end {
            WatchEnd::ReceiverGone => return,
            WatchEnd::Broken(error) => {
                outage.failed(&error);
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            WatchEnd::Compacted => {
                tracing::info!(prefix = %prefix, from = next, "watch history compacted; relisting");
                let listing = loop {
                    match core.list(&prefix).await {
                        Ok(listing) => break listing,
                        Err(error) => {
                            outage.failed(&error);
                            tokio::select! {
                                _ = tx.closed() => return,
                                _ = tokio::time::sleep(backoff.next_delay()) => {}
                            }
                        }
                    }
                };
                next = listing.revision + 1;
                if tx.send(WatchEvent::Reset(listing)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One watch stream from `next` on, advancing `next` past every response fully delivered, so
/// the following stream resumes exactly where this one broke.
async fn watch_stream(
    core: &Core,
    prefix: &str,
    next: &mut Revision,
    tx: &mpsc::Sender<WatchEvent>,
    backoff: &mut Backoff,
    outage: &mut Outage,
) -> WatchEnd {
    let (key, end) = core.range(prefix);
    let options = WatchOptions::new()
        .with_range(end)
        .with_start_revision(*next)
        // Lets a quiet prefix advance `next`, so a reconnect after a compaction needs no relist.
        .with_progress_notify();
    let mut client = core.client.watch_client();
    let sent = core.login_generation();
    // The crate asserts that etcd's first answer creates the watch; in a task of its own that
    // assertion (should a server ever break it) costs one retry instead of this watch.
    let mut create = tokio::spawn(async move { client.watch(key, Some(options)).await });
    let (_watcher, mut stream) = match tokio::time::timeout(REQUEST_TIMEOUT, &mut create).await {
        Ok(Ok(Ok(created))) => created,
        Ok(Ok(Err(e))) if is_compacted(&e) => return WatchEnd::Compacted,
        Ok(Ok(Err(e))) => return WatchEnd::Broken(core.fail(e, sent).await.to_string()),
        Ok(Err(e)) => return WatchEnd::Broken(format!("creating the watch failed: {e}")),
        Err(_) => {
            create.abort();
            return WatchEnd::Broken(timeout_error().to_string());
        }
    };
    outage.recovered();
    let created = Instant::now();
    let end = async {
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return WatchEnd::Broken("watch stream ended".into()),
                Err(e) if is_compacted(&e) => return WatchEnd::Compacted,
                Err(e) => return WatchEnd::Broken(core.fail(e, sent).await.to_string()),
            };
            if response.compact_revision() > 0 {
                return WatchEnd::Compacted;
            }
            if response.canceled() {
                let reason = response.cancel_reason();
                if reason.contains("compacted") {
                    return WatchEnd::Compacted;
                }
                return WatchEnd::Broken(format!("etcd cancelled the watch: {reason}"));
            }
            if response.events().is_empty() {
                // A progress notification: everything up to its revision was delivered. (Only
                // without events: with events, the header may run ahead of the batch.)
                if !response.created() {
                    if let Some(header) = response.header() {
                        *next = (*next).max(header.revision() + 1);
                    }
                }
                continue;
            }
            // etcd never splits one revision across responses (we ask for no fragments), so a
            // stream breaking between responses leaves no revision half-delivered.
            let mut last = *next - 1;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(key) = core.rel(kv.key()) else {
                    continue;
                };
                last = last.max(kv.mod_revision());
                let event = match event.event_type() {
                    EventType::Put => WatchEvent::Put(KeyValue {
                        key,
                        value: kv.value().to_vec(),
                        create_revision: kv.create_revision(),
                        mod_revision: kv.mod_revision(),
                    }),
                    EventType::Delete => WatchEvent::Delete {
                        key,
                        revision: kv.mod_revision(),
                    },
                };
                if tx.send(event).await.is_err() {
                    return WatchEnd::ReceiverGone;
                }
            }
            *next = last + 1;
        }
    }
    .await;
    // A stream that lived a while was a working connection, whatever ended it; one that etcd
    // ends right after creating it must not be retried at full speed.
    if created.elapsed() >= BACKOFF_MAX {
        backoff.reset();
    }
    end
}
