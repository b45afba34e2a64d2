//! One shard's routing state: its slice of the follow graph, its connected subscribers, and
//! their pending output. Pure logic, no I/O: the shard task (`shard.rs`) feeds it ordered
//! batches and writes out what it appends.
//!
//! Each client slot also carries a handle of the caller's choosing (`H`): the shard keeps its
//! client's I/O handle there ([`crate::client_io::ClientIo`]), so a client lives in one place,
//! taken with its slot at [`Router::register`] and dropped with it at [`Router::free`]; the
//! tests and benchmarks use `()`.
//!
//! A shard owns the users whose id hashes to it ([`owner`]). It keeps the follow edges whose
//! *follower* it owns, and beside them a fan-out index (followee -> connected local followers),
//! so a status update costs one map lookup plus one append per notification, whatever the size
//! of the graph. Applying a batch appends each notification to its client's output buffer
//! (payload and `\n`, byte for byte) and lists the clients whose buffer went from empty to
//! non-empty, so each gets one coalesced write per batch.

use std::collections::{HashMap, HashSet};

use ahash::RandomState;
use smallvec::SmallVec;

use crate::batch::OrderedBatch;
use crate::protocol::EventKind;

/// Fixed hash keys: the user -> shard mapping is the same in every run and every process.
const OWNER_HASH_KEYS: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];

/// Maps user ids to shards, the same way in every shard and every run.
#[derive(Clone, Debug)]
pub struct Ownership {
    hasher: RandomState,
    shards: usize,
}

impl Ownership {
    /// The mapping for `shards` shards.
    pub fn new(shards: usize) -> Self {
        let [a, b, c, d] = OWNER_HASH_KEYS;
        Ownership {
            hasher: RandomState::with_seeds(a, b, c, d),
            shards,
        }
    }

    /// The shard that owns `user`.
    #[inline]
    pub fn owner(&self, user: u64) -> usize {
        if self.shards == 1 {
            0
        } else {
            (self.hasher.hash_one(user) % self.shards as u64) as usize
        }
    }
}

/// Index of a client connection in its shard.
pub type ClientId = u32;

type FastMap<K, V> = HashMap<K, V, RandomState>;
type FastSet<K> = HashSet<K, RandomState>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    /// Registered: receives notifications.
    Open,
    /// Out of the routing tables; its writer is still flushing or closing it.
    Detached,
    /// Slot free for reuse.
    Free,
}

#[derive(Debug)]
struct ClientSlot<H> {
    user: u64,
    state: ClientState,
    /// The caller's handle of this client, from `register` until `free`.
    handle: Option<H>,
    pending: Vec<u8>,
    /// Bytes handed to the writer and not yet written.
    in_flight: usize,
    /// Capacity of the buffer handed to the writer, until it is written.
    in_flight_capacity: usize,
    /// Position in `Router::open_clients`.
    open_index: u32,
    /// Notifications in `pending` (a u32, which pairs with `open_index`: the slot grows by 8
    /// bytes only).
    pending_notifications: u32,
    /// Release time of the oldest notification in `pending` (0 when empty or unstamped).
    pending_since_ns: u64,
}

/// What a writer took with a client's pending output: how many notifications, and when the
/// oldest of them was released (0: not stamped). See [`crate::latency`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TakenOutput {
    /// Notifications in the bytes taken.
    pub notifications: u64,
    /// Release time of the oldest one, ns ([`crate::latency::now_ns`]); 0 if not stamped.
    pub oldest_released_ns: u64,
}

#[derive(Debug, Default)]
struct Subscriber {
    user: u64,
    clients: SmallVec<[ClientId; 2]>,
}

/// Above this capacity an idle output buffer is shrunk back, so a past burst does not pin
/// memory.
pub const IDLE_BUFFER_KEEP: usize = 256 * 1024;

/// The routing state of one shard; `H` is the handle each client slot carries.
#[derive(Debug)]
pub struct Router<H = ()> {
    shard: usize,
    ownership: Ownership,
    /// follower (owned here) -> followees.
    following: FastMap<u64, FastSet<u64>>,
    /// followee -> subscribers (connected local followers).
    fanout: FastMap<u64, SmallVec<[u32; 4]>>,
    /// user -> subscriber slot, for connected local users.
    subscriber_of: FastMap<u64, u32>,
    subscribers: Vec<Subscriber>,
    free_subscribers: Vec<u32>,
    outputs: Outputs<H>,
    free_clients: Vec<ClientId>,
    open_clients: Vec<ClientId>,
}

/// Every client slot's pending output, and what appending to it records.
#[derive(Debug)]
struct Outputs<H> {
    clients: Vec<ClientSlot<H>>,
    max_backlog: usize,
    /// Clients whose pending output went from empty to non-empty since the last take.
    dirty: Vec<ClientId>,
    /// Clients that passed the backlog limit since the last take.
    over_backlog: Vec<ClientId>,
    notifications: u64,
    /// Release time of the batch being applied, stamped on a client's first pending
    /// notification.
    batch_released_ns: u64,
    /// Capacity of every pending and in-flight output buffer of this shard, bytes: what the
    /// server-wide `--max-output-memory` budget counts.
    memory: u64,
    /// The part of `memory` already added to the server-wide gauge.
    published: u64,
}

impl<H> Outputs<H> {
    /// Appends one notification to an open client's pending output.
    #[inline]
    fn append(&mut self, client: ClientId, bytes: &[u8]) {
        let slot = &mut self.clients[client as usize];
        if slot.state != ClientState::Open {
            return;
        }
        let was_empty = slot.pending.is_empty();
        let backlog_before = slot.pending.len() + slot.in_flight;
        let capacity_before = slot.pending.capacity();
        slot.pending.extend_from_slice(bytes);
        let capacity = slot.pending.capacity();
        if capacity != capacity_before {
            self.memory += (capacity - capacity_before) as u64;
        }
        if was_empty {
            // Every batch is stamped (`crate::latency`), so the first one is the oldest.
            slot.pending_since_ns = self.batch_released_ns;
            self.dirty.push(client);
        }
        slot.pending_notifications = slot.pending_notifications.saturating_add(1);
        let backlog = backlog_before + bytes.len();
        if backlog > self.max_backlog && backlog_before <= self.max_backlog {
            self.over_backlog.push(client);
        }
        self.notifications += 1;
    }
}

impl<H> Router<H> {
    /// The router of shard `shard` of `shards`, closing clients past `max_backlog` bytes.
    pub fn new(shard: usize, shards: usize, max_backlog: usize) -> Self {
        Router {
            shard,
            ownership: Ownership::new(shards),
            following: FastMap::default(),
            fanout: FastMap::default(),
            subscriber_of: FastMap::default(),
            subscribers: Vec::new(),
            free_subscribers: Vec::new(),
            outputs: Outputs {
                clients: Vec::new(),
                max_backlog,
                dirty: Vec::new(),
                over_backlog: Vec::new(),
                notifications: 0,
                batch_released_ns: 0,
                memory: 0,
                published: 0,
            },
            free_clients: Vec::new(),
            open_clients: Vec::new(),
        }
    }

    /// Whether this shard owns `user`.
    #[inline]
    pub fn owns(&self, user: u64) -> bool {
        self.ownership.owner(user) == self.shard
    }

    /// Registers a new connection of `user` (owned by this shard), carrying `handle`; it
    /// receives every notification of the batches applied from now on.
    pub fn register(&mut self, user: u64, handle: H) -> ClientId {
        debug_assert!(self.owns(user));
        let id = match self.free_clients.pop() {
            Some(id) => id,
            None => {
                self.outputs.clients.push(ClientSlot {
                    user,
                    state: ClientState::Free,
                    handle: None,
                    pending: Vec::new(),
                    in_flight: 0,
                    in_flight_capacity: 0,
                    open_index: 0,
                    pending_since_ns: 0,
                    pending_notifications: 0,
                });
                (self.outputs.clients.len() - 1) as ClientId
            }
        };
        let slot = &mut self.outputs.clients[id as usize];
        slot.user = user;
        slot.state = ClientState::Open;
        slot.handle = Some(handle);
        slot.pending.clear();
        slot.pending_notifications = 0;
        slot.pending_since_ns = 0;
        slot.in_flight = 0;
        debug_assert_eq!(slot.in_flight_capacity, 0);
        slot.open_index = self.open_clients.len() as u32;
        self.open_clients.push(id);

        let subscriber = match self.subscriber_of.get(&user) {
            Some(&index) => index,
            None => {
                let index = match self.free_subscribers.pop() {
                    Some(index) => index,
                    None => {
                        self.subscribers.push(Subscriber::default());
                        (self.subscribers.len() - 1) as u32
                    }
                };
                self.subscribers[index as usize].user = user;
                self.subscriber_of.insert(user, index);
                if let Some(followees) = self.following.get(&user) {
                    for &followee in followees {
                        self.fanout.entry(followee).or_default().push(index);
                    }
                }
                index
            }
        };
        self.subscribers[subscriber as usize].clients.push(id);
        id
    }

    /// Takes a client out of the routing tables: it receives nothing more. Its pending
    /// output stays until [`free`](Self::free), so a graceful close can still write it.
    pub fn detach(&mut self, client: ClientId) {
        let slot = &mut self.outputs.clients[client as usize];
        if slot.state != ClientState::Open {
            return;
        }
        slot.state = ClientState::Detached;
        let user = slot.user;
        let open_index = slot.open_index as usize;
        self.open_clients.swap_remove(open_index);
        if let Some(&moved) = self.open_clients.get(open_index) {
            self.outputs.clients[moved as usize].open_index = open_index as u32;
        }
        let Some(&subscriber) = self.subscriber_of.get(&user) else {
            return;
        };
        let clients = &mut self.subscribers[subscriber as usize].clients;
        if let Some(position) = clients.iter().position(|&c| c == client) {
            clients.swap_remove(position);
        }
        if !clients.is_empty() {
            return;
        }
        self.subscriber_of.remove(&user);
        self.free_subscribers.push(subscriber);
        if let Some(followees) = self.following.get(&user) {
            for followee in followees {
                remove_subscriber(&mut self.fanout, *followee, subscriber);
            }
        }
    }

    /// Frees a detached client's slot (its writer is done with it), dropping its handle.
    pub fn free(&mut self, client: ClientId) {
        self.detach(client);
        let slot = &mut self.outputs.clients[client as usize];
        if slot.state == ClientState::Free {
            return;
        }
        slot.state = ClientState::Free;
        slot.handle = None;
        let released = slot.pending.capacity() + slot.in_flight_capacity;
        slot.in_flight = 0;
        slot.in_flight_capacity = 0;
        slot.pending = Vec::new();
        slot.pending_notifications = 0;
        slot.pending_since_ns = 0;
        self.outputs.memory -= released as u64;
        self.free_clients.push(client);
    }

    /// The handle of a client, until its slot is freed.
    #[inline]
    pub fn handle(&self, client: ClientId) -> Option<&H> {
        self.outputs.clients.get(client as usize)?.handle.as_ref()
    }

    /// The handle of every client whose slot is not freed (open or still being written out).
    pub fn handles(&self) -> impl Iterator<Item = &H> {
        self.outputs
            .clients
            .iter()
            .filter_map(|slot| slot.handle.as_ref())
    }

    /// The user of a client.
    pub fn user_of(&self, client: ClientId) -> u64 {
        self.outputs.clients[client as usize].user
    }

    /// Every registered client.
    pub fn open_clients(&self) -> &[ClientId] {
        &self.open_clients
    }

    /// Forgets the follow graph (end of a session). Registered clients stay registered.
    pub fn reset_graph(&mut self) {
        self.following.clear();
        self.fanout.clear();
    }

    /// Appends every follow edge of this shard, `(follower, followee)`, to `into`.
    pub fn export_edges(&self, into: &mut Vec<(u64, u64)>) {
        for (&follower, followees) in &self.following {
            into.extend(followees.iter().map(|&followee| (follower, followee)));
        }
    }

    /// Replaces the follow graph with the edges of `edges` whose follower this shard owns.
    /// Registered clients stay registered; their fan-out follows the new graph.
    pub fn import_edges(&mut self, edges: &[(u64, u64)]) {
        self.reset_graph();
        for &(follower, followee) in edges {
            if self.owns(follower) {
                self.follow(follower, followee);
            }
        }
    }

    /// Applies an ordered batch: graph changes and notifications, in seq order.
    pub fn apply(&mut self, batch: &OrderedBatch) {
        self.outputs.batch_released_ns = batch.released_ns();
        for batched in batch.events() {
            let event = batched.event;
            match event.kind {
                EventKind::Follow => {
                    if self.owns(event.from) {
                        self.follow(event.from, event.to);
                    }
                    if self.owns(event.to) {
                        self.notify_user(event.to, batch.notification(batched));
                    }
                }
                EventKind::Unfollow => {
                    if self.owns(event.from) {
                        self.unfollow(event.from, event.to);
                    }
                }
                EventKind::Private => {
                    if self.owns(event.to) {
                        self.notify_user(event.to, batch.notification(batched));
                    }
                }
                EventKind::Status => {
                    self.notify_followers(event.from, batch.notification(batched));
                }
                EventKind::Broadcast => {
                    let bytes = batch.notification(batched);
                    for &client in &self.open_clients {
                        self.outputs.append(client, bytes);
                    }
                }
                EventKind::Malformed => {}
            }
        }
    }

    fn follow(&mut self, follower: u64, followee: u64) {
        let added = self.following.entry(follower).or_default().insert(followee);
        if added {
            if let Some(&subscriber) = self.subscriber_of.get(&follower) {
                self.fanout.entry(followee).or_default().push(subscriber);
            }
        }
    }

    fn unfollow(&mut self, follower: u64, followee: u64) {
        let removed = self
            .following
            .get_mut(&follower)
            .is_some_and(|followees| followees.remove(&followee));
        if removed {
            if let Some(&subscriber) = self.subscriber_of.get(&follower) {
                remove_subscriber(&mut self.fanout, followee, subscriber);
            }
        }
    }

    #[inline]
    fn notify_user(&mut self, user: u64, bytes: &[u8]) {
        if let Some(&subscriber) = self.subscriber_of.get(&user) {
            for &client in &self.subscribers[subscriber as usize].clients {
                self.outputs.append(client, bytes);
            }
        }
    }

    #[inline]
    fn notify_followers(&mut self, followee: u64, bytes: &[u8]) {
        let Some(followers) = self.fanout.get(&followee) else {
            return;
        };
        for &subscriber in followers {
            for &client in &self.subscribers[subscriber as usize].clients {
                self.outputs.append(client, bytes);
            }
        }
    }

    /// Clients whose output went from empty to non-empty since the last call.
    pub fn take_dirty(&mut self, into: &mut Vec<ClientId>) {
        into.clear();
        std::mem::swap(into, &mut self.outputs.dirty);
    }

    /// Clients that passed the backlog limit since the last call.
    pub fn take_over_backlog(&mut self, into: &mut Vec<ClientId>) {
        into.clear();
        std::mem::swap(into, &mut self.outputs.over_backlog);
    }

    /// Notifications appended since the last call.
    pub fn take_notification_count(&mut self) -> u64 {
        std::mem::take(&mut self.outputs.notifications)
    }

    /// Hands a client's pending output to its writer: swaps it with `into` (which must be
    /// empty), so no bytes are copied and both buffers keep their capacity. Says how many
    /// notifications it holds and when the oldest was released.
    pub fn take_pending(&mut self, client: ClientId, into: &mut Vec<u8>) -> TakenOutput {
        let slot = &mut self.outputs.clients[client as usize];
        debug_assert!(into.is_empty());
        if slot.pending.is_empty() {
            return TakenOutput::default();
        }
        let taken = TakenOutput {
            notifications: u64::from(std::mem::take(&mut slot.pending_notifications)),
            oldest_released_ns: std::mem::take(&mut slot.pending_since_ns),
        };
        let before = slot.pending.capacity() + slot.in_flight_capacity;
        std::mem::swap(into, &mut slot.pending);
        slot.in_flight = into.len();
        slot.in_flight_capacity = into.capacity();
        let after = slot.pending.capacity() + slot.in_flight_capacity;
        self.outputs.memory = self.outputs.memory + after as u64 - before as u64;
        taken
    }

    /// The writer finished writing what it took; `buffer` is kept by the writer for reuse.
    pub fn written(&mut self, client: ClientId) {
        let slot = &mut self.outputs.clients[client as usize];
        self.outputs.memory -= slot.in_flight_capacity as u64;
        slot.in_flight = 0;
        slot.in_flight_capacity = 0;
    }

    /// Drops a client's pending output (it is being aborted) and stops counting what its
    /// writer holds; returns the bytes of buffer capacity no longer counted.
    pub fn discard_output(&mut self, client: ClientId) -> u64 {
        let slot = &mut self.outputs.clients[client as usize];
        if slot.state == ClientState::Free {
            return 0;
        }
        let released = (slot.pending.capacity() + slot.in_flight_capacity) as u64;
        slot.pending = Vec::new();
        slot.pending_notifications = 0;
        slot.pending_since_ns = 0;
        slot.in_flight_capacity = 0;
        self.outputs.memory -= released;
        released
    }

    /// Unsent output of a client: pending plus handed to its writer.
    pub fn backlog(&self, client: ClientId) -> usize {
        let slot = &self.outputs.clients[client as usize];
        slot.pending.len() + slot.in_flight
    }

    /// Every client that is not freed and has unsent output, as `(backlog, client)`, largest
    /// backlog first.
    pub fn clients_by_backlog(&self, into: &mut Vec<(usize, ClientId)>) {
        into.clear();
        for (index, slot) in self.outputs.clients.iter().enumerate() {
            let backlog = slot.pending.len() + slot.in_flight;
            if slot.state != ClientState::Free && backlog > 0 {
                into.push((backlog, index as ClientId));
            }
        }
        into.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Capacity of every pending and in-flight output buffer of this shard, bytes.
    pub fn output_memory(&self) -> u64 {
        self.outputs.memory
    }

    /// The change of [`output_memory`](Self::output_memory) since the last call, as
    /// `(added, removed)` (one of them zero), for the server-wide gauge.
    pub fn take_output_memory_change(&mut self) -> (u64, u64) {
        let outputs = &mut self.outputs;
        let change = if outputs.memory >= outputs.published {
            (outputs.memory - outputs.published, 0)
        } else {
            (0, outputs.published - outputs.memory)
        };
        outputs.published = outputs.memory;
        change
    }

    /// A client's own pending buffer (for tests and benchmarks).
    pub fn pending(&self, client: ClientId) -> &[u8] {
        &self.outputs.clients[client as usize].pending
    }

    /// Clears a client's pending buffer (for benchmarks that do not write).
    pub fn clear_pending(&mut self, client: ClientId) {
        let slot = &mut self.outputs.clients[client as usize];
        let before = slot.pending.capacity();
        slot.pending.clear();
        slot.pending_notifications = 0;
        slot.pending_since_ns = 0;
        if slot.pending.capacity() > IDLE_BUFFER_KEEP {
            slot.pending.shrink_to(IDLE_BUFFER_KEEP);
        }
        self.outputs.memory -= (before - slot.pending.capacity()) as u64;
    }
}

fn remove_subscriber(fanout: &mut FastMap<u64, SmallVec<[u32; 4]>>, followee: u64, sub: u32) {
    if let Some(list) = fanout.get_mut(&followee) {
        if let Some(position) = list.iter().position(|&s| s == sub) {
            list.swap_remove(position);
        }
        if list.is_empty() {
            fanout.remove(&followee);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse_event;

    fn batch(lines: &[&str]) -> OrderedBatch {
        let mut batch = OrderedBatch::default();
        for line in lines {
            batch.push(parse_event(line.as_bytes()).unwrap(), line.as_bytes());
        }
        batch
    }

    fn output(router: &mut Router, client: ClientId) -> String {
        let mut buffer = Vec::new();
        router.take_pending(client, &mut buffer);
        router.written(client);
        String::from_utf8(buffer).unwrap()
    }

    #[test]
    fn each_event_type_notifies_the_right_users() {
        let mut router = Router::new(0, 1, 1 << 20);
        let alice = router.register(1, ());
        let bob = router.register(2, ());
        let carol = router.register(3, ());
        router.apply(&batch(&[
            "1|F|1|2",  // 1 follows 2: 2 notified
            "2|F|3|2",  // 3 follows 2: 2 notified
            "3|S|2",    // 1 and 3 notified
            "4|U|1|2",  // nobody
            "5|S|2",    // 3 only
            "6|P|2|1",  // 1
            "7|B",      // all
            "8|P|1|99", // nobody connected
            "9|F|99|1", // 1 notified
        ]));
        assert_eq!(
            output(&mut router, alice),
            "3|S|2\n6|P|2|1\n7|B\n9|F|99|1\n"
        );
        assert_eq!(output(&mut router, bob), "1|F|1|2\n2|F|3|2\n7|B\n");
        assert_eq!(output(&mut router, carol), "3|S|2\n5|S|2\n7|B\n");
        assert_eq!(router.take_notification_count(), 10);
    }

    #[test]
    fn a_taken_output_counts_its_notifications_and_keeps_the_oldest_release_time() {
        let mut router = Router::new(0, 1, 1 << 20);
        let alice = router.register(1, ());
        let bob = router.register(2, ());
        let mut first = batch(&["1|B", "2|P|9|1"]);
        first.stamp_released(1_000);
        let mut second = batch(&["3|B"]);
        second.stamp_released(2_000);
        router.apply(&first);
        router.apply(&second);
        let mut buffer = Vec::new();
        let taken = router.take_pending(alice, &mut buffer);
        assert_eq!(buffer, b"1|B\n2|P|9|1\n3|B\n");
        assert_eq!(
            taken,
            TakenOutput {
                notifications: 3,
                oldest_released_ns: 1_000
            }
        );
        router.written(alice);
        // Bob's output was not taken: still counted from the first batch; once taken, a later
        // batch starts a new count at its own time.
        buffer.clear();
        let taken = router.take_pending(bob, &mut buffer);
        assert_eq!((taken.notifications, taken.oldest_released_ns), (2, 1_000));
        router.written(bob);
        let mut third = batch(&["4|B"]);
        third.stamp_released(3_000);
        router.apply(&third);
        buffer.clear();
        let taken = router.take_pending(bob, &mut buffer);
        assert_eq!((taken.notifications, taken.oldest_released_ns), (1, 3_000));
        buffer.clear();
        assert_eq!(router.take_pending(alice, &mut Vec::new()).notifications, 1);
        assert_eq!(
            router.take_pending(alice, &mut buffer),
            TakenOutput::default()
        );
    }

    #[test]
    fn follow_twice_is_once_and_unknown_unfollow_changes_nothing() {
        let mut router = Router::new(0, 1, 1 << 20);
        let follower = router.register(1, ());
        router.apply(&batch(&["1|F|1|2", "2|F|1|2", "3|U|1|7", "4|S|2"]));
        assert_eq!(output(&mut router, follower), "4|S|2\n");
    }

    #[test]
    fn edges_exist_before_the_follower_connects_and_after_it_leaves() {
        let mut router = Router::new(0, 1, 1 << 20);
        router.apply(&batch(&["1|F|1|2"]));
        let first = router.register(1, ());
        router.apply(&batch(&["2|S|2"]));
        assert_eq!(output(&mut router, first), "2|S|2\n");
        router.detach(first);
        router.free(first);
        router.apply(&batch(&["3|S|2"]));
        let again = router.register(1, ());
        router.apply(&batch(&["4|S|2"]));
        assert_eq!(output(&mut router, again), "4|S|2\n");
    }

    #[test]
    fn two_connections_of_one_user_both_receive() {
        let mut router = Router::new(0, 1, 1 << 20);
        let phone = router.register(5, ());
        let laptop = router.register(5, ());
        router.apply(&batch(&["1|P|1|5", "2|F|5|9", "3|S|9"]));
        router.detach(phone);
        router.apply(&batch(&["4|S|9", "5|P|1|5"]));
        assert_eq!(output(&mut router, phone), "1|P|1|5\n3|S|9\n");
        assert_eq!(
            output(&mut router, laptop),
            "1|P|1|5\n3|S|9\n4|S|9\n5|P|1|5\n"
        );
    }

    #[test]
    fn shards_split_users_and_together_notify_everyone_once() {
        let shards = 4;
        let mut routers: Vec<Router> = (0..shards)
            .map(|s| Router::new(s, shards, 1 << 20))
            .collect();
        let mut clients = Vec::new();
        for user in 1..=20u64 {
            let owner = Ownership::new(shards).owner(user);
            clients.push((user, owner, routers[owner].register(user, ())));
        }
        let mut lines = Vec::new();
        let mut seq = 0;
        for follower in 1..=20u64 {
            seq += 1;
            lines.push(format!("{seq}|F|{follower}|{}", follower % 3 + 1));
        }
        seq += 1;
        lines.push(format!("{seq}|S|1"));
        let lines: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
        let ordered = batch(&lines);
        for router in &mut routers {
            router.apply(&ordered);
        }
        let mut followers_of_1 = 0;
        for (user, owner, client) in clients {
            let text = output(&mut routers[owner], client);
            if user % 3 == 0 {
                assert!(
                    text.ends_with(&format!("{seq}|S|1\n")),
                    "user {user}: {text}"
                );
                followers_of_1 += 1;
            } else {
                assert!(!text.contains("|S|"), "user {user}: {text}");
            }
        }
        assert_eq!(followers_of_1, 6);
    }

    #[test]
    fn exported_edges_imported_elsewhere_route_the_same() {
        let shards = 3;
        let mut old: Vec<Router> = (0..shards)
            .map(|s| Router::new(s, shards, 1 << 20))
            .collect();
        let graph = batch(&["1|F|1|2", "2|F|3|2", "3|F|4|2", "4|U|3|2", "5|F|2|4"]);
        let mut edges = Vec::new();
        for router in &mut old {
            router.apply(&graph);
            router.export_edges(&mut edges);
        }
        edges.sort_unstable();
        assert_eq!(edges, vec![(1, 2), (2, 4), (4, 2)]);
        let ownership = Ownership::new(shards);
        let mut new: Vec<Router> = (0..shards)
            .map(|s| Router::new(s, shards, 1 << 20))
            .collect();
        let clients: Vec<(u64, usize, ClientId)> = (1..=4)
            .map(|user| {
                let owner = ownership.owner(user);
                (user, owner, new[owner].register(user, ()))
            })
            .collect();
        for router in &mut new {
            router.import_edges(&edges);
            router.apply(&batch(&["6|S|2", "7|S|4"]));
        }
        for (user, owner, client) in clients {
            let want = match user {
                1 => "6|S|2\n",
                2 => "7|S|4\n",
                4 => "6|S|2\n",
                _ => "",
            };
            assert_eq!(output(&mut new[owner], client), want, "user {user}");
        }
    }

    #[test]
    fn a_client_slot_carries_its_handle_until_it_is_freed() {
        let handle = std::rc::Rc::new(());
        let mut router: Router<std::rc::Rc<()>> = Router::new(0, 1, 1 << 20);
        let first = router.register(1, handle.clone());
        let second = router.register(2, handle.clone());
        assert_eq!(std::rc::Rc::strong_count(&handle), 3);
        assert!(router.handle(first).is_some());
        router.detach(first);
        assert!(router.handle(first).is_some(), "kept while its writer ends");
        assert_eq!(router.handles().count(), 2);
        router.free(first);
        assert!(router.handle(first).is_none());
        assert_eq!(router.handles().count(), 1);
        assert_eq!(std::rc::Rc::strong_count(&handle), 2);
        let reused = router.register(3, handle.clone());
        assert_eq!(reused, first, "a freed slot is reused");
        router.free(second);
        router.free(reused);
        assert_eq!(std::rc::Rc::strong_count(&handle), 1);
        assert!(router.handle(99).is_none());
    }

    #[test]
    fn backlog_limit_flags_a_client_once_and_dirty_lists_each_client_once() {
        let mut router = Router::new(0, 1, 10);
        let slow = router.register(1, ());
        router.apply(&batch(&["1|P|2|1", "2|P|2|1", "3|P|2|1"]));
        let mut list = Vec::new();
        router.take_dirty(&mut list);
        assert_eq!(list, vec![slow]);
        router.take_over_backlog(&mut list);
        assert_eq!(list, vec![slow]);
        router.apply(&batch(&["4|P|2|1"]));
        router.take_over_backlog(&mut list);
        assert!(list.is_empty());
    }

    #[test]
    fn output_memory_follows_every_buffer_and_ranks_backlogs() {
        let mut router = Router::new(0, 1, 1 << 20);
        let small = router.register(1, ());
        let large = router.register(2, ());
        router.apply(&batch(&["1|P|9|1", "2|P|9|2", "3|P|9|2", "4|P|9|2"]));
        let counted = router.output_memory();
        assert!(counted >= 4 * 8, "{counted}");
        assert_eq!(router.take_output_memory_change(), (counted, 0));
        let mut ranked = Vec::new();
        router.clients_by_backlog(&mut ranked);
        assert_eq!(ranked, vec![(24, large), (8, small)]);
        let mut in_flight = Vec::new();
        router.take_pending(large, &mut in_flight);
        assert_eq!(
            router.output_memory(),
            counted,
            "handed over, still counted"
        );
        assert_eq!(router.backlog(large), 24);
        let released = router.discard_output(large);
        assert!(released >= 24);
        router.written(large);
        router.detach(small);
        router.free(small);
        router.free(large);
        assert_eq!(router.output_memory(), 0);
        assert_eq!(router.take_output_memory_change(), (0, counted));
    }
}
