//! The expected-notification model: the follow graph restricted to what some connected client
//! can observe, and who is notified of each event.
//!
//! Each client reader holds one [`Model`] for its own client connections ("slots"). Only edges
//! whose follower is one of those users are kept (an edge from an unconnected user changes no
//! notification), as, per followee, a set of local follower users: a short list, or a bitset
//! over the local users once the list would be larger. A status update therefore costs the
//! number of connected followers, not the number of users.

use smallvec::SmallVec;

use super::workload::{Event, Kind, Workload};

const NOT_LOCAL: u32 = u32::MAX;
/// Smallest list length at which a follower set may become a bitset.
const MIN_DENSE_LEN: usize = 8;

/// The local followers of one user.
#[derive(Clone, Debug)]
enum FollowerSet {
    Small(SmallVec<[u32; 4]>),
    Dense(Box<[u64]>),
}

/// Follow graph and notification rules for a set of client slots.
#[derive(Debug)]
pub struct Model {
    /// user id -> local user index, or NOT_LOCAL.
    local_of_user: Vec<u32>,
    /// local user index -> its slots.
    slots_of_local: Vec<SmallVec<[u32; 1]>>,
    /// Every slot, for broadcasts.
    all_slots: Vec<u32>,
    /// followee user id -> local followers.
    followers: Vec<FollowerSet>,
    /// Words of a dense follower set.
    words: usize,
}

impl Model {
    /// A model for users `0..=max_user` and the given (slot, user) client connections.
    /// Several slots may carry one user.
    pub fn new(max_user: u64, clients: &[(u32, u64)]) -> Model {
        let mut local_of_user = vec![NOT_LOCAL; max_user as usize + 1];
        let mut slots_of_local: Vec<SmallVec<[u32; 1]>> = Vec::new();
        for &(slot, user) in clients {
            assert!(
                user <= max_user,
                "client user {user} beyond the largest user {max_user}"
            );
            let l = &mut local_of_user[user as usize];
            if *l == NOT_LOCAL {
                *l = slots_of_local.len() as u32;
                slots_of_local.push(SmallVec::new());
            }
            slots_of_local[*l as usize].push(slot);
        }
        let words = slots_of_local.len().div_ceil(64);
        Model {
            local_of_user,
            slots_of_local,
            all_slots: clients.iter().map(|c| c.0).collect(),
            followers: vec![FollowerSet::Small(SmallVec::new()); max_user as usize + 1],
            words,
        }
    }

    #[inline]
    fn local(&self, user: u64) -> Option<u32> {
        match self.local_of_user.get(user as usize) {
            Some(&l) if l != NOT_LOCAL => Some(l),
            _ => None,
        }
    }

    #[inline]
    fn notify_user(&self, user: u64, notify: &mut impl FnMut(u32)) {
        if let Some(l) = self.local(user) {
            for &s in &self.slots_of_local[l as usize] {
                notify(s);
            }
        }
    }

    /// Applies `ev` to the graph and calls `notify(slot)` for every slot it notifies (in no
    /// particular order; each slot at most once).
    #[inline]
    pub fn apply(&mut self, ev: &Event, mut notify: impl FnMut(u32)) {
        match ev.kind {
            Kind::Follow => {
                if let Some(l) = self.local(ev.from) {
                    self.follow(ev.to, l);
                }
                self.notify_user(ev.to, &mut notify);
            }
            Kind::Unfollow => {
                if let Some(l) = self.local(ev.from) {
                    self.unfollow(ev.to, l);
                }
            }
            Kind::Private => self.notify_user(ev.to, &mut notify),
            Kind::Broadcast => {
                for &s in &self.all_slots {
                    notify(s);
                }
            }
            Kind::Status => {
                let Some(set) = self.followers.get(ev.from as usize) else {
                    return;
                };
                match set {
                    FollowerSet::Small(list) => {
                        for &l in list {
                            for &s in &self.slots_of_local[l as usize] {
                                notify(s);
                            }
                        }
                    }
                    FollowerSet::Dense(bits) => {
                        for (w, &word) in bits.iter().enumerate() {
                            let mut word = word;
                            while word != 0 {
                                let l = w * 64 + word.trailing_zeros() as usize;
                                word &= word - 1;
                                for &s in &self.slots_of_local[l] {
                                    notify(s);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn follow(&mut self, followee: u64, l: u32) {
        let words = self.words;
        let Some(set) = self.followers.get_mut(followee as usize) else {
            return;
        };
        match set {
            FollowerSet::Small(list) => {
                if list.contains(&l) {
                    return;
                }
                list.push(l);
                if list.len() >= MIN_DENSE_LEN.max(2 * words) {
                    let mut bits = vec![0u64; words].into_boxed_slice();
                    for &x in list.iter() {
                        bits[x as usize / 64] |= 1 << (x % 64);
                    }
                    *set = FollowerSet::Dense(bits);
                }
            }
            FollowerSet::Dense(bits) => bits[l as usize / 64] |= 1 << (l % 64),
        }
    }

    fn unfollow(&mut self, followee: u64, l: u32) {
        let Some(set) = self.followers.get_mut(followee as usize) else {
            return;
        };
        match set {
            FollowerSet::Small(list) => {
                if let Some(i) = list.iter().position(|&x| x == l) {
                    list.swap_remove(i);
                }
            }
            FollowerSet::Dense(bits) => bits[l as usize / 64] &= !(1 << (l % 64)),
        }
    }
}

/// Every client's expected byte stream for a whole workload (each notification is the payload
/// and `\n`), without any socket: for tests and small comparisons. Holds everything in memory.
pub fn expected_streams(workload: &mut dyn Workload) -> anyhow::Result<Vec<Vec<u8>>> {
    let clients: Vec<(u32, u64)> = workload
        .clients()
        .iter()
        .enumerate()
        .map(|(i, &u)| (i as u32, u))
        .collect();
    let mut model = Model::new(workload.max_user(), &clients);
    let mut out = vec![Vec::new(); clients.len()];
    while let Some(batch) = workload.next_batch()? {
        for (i, ev) in batch.model.events.iter().enumerate() {
            let payload = batch.model.payload_of(i);
            model.apply(ev, |s| {
                out[s as usize].extend_from_slice(payload);
                out[s as usize].push(b'\n');
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, kind: Kind, from: u64, to: u64) -> Event {
        Event {
            seq,
            kind,
            from,
            to,
        }
    }

    fn run(model: &mut Model, events: &[Event]) -> Vec<Vec<u64>> {
        let mut got = vec![Vec::new(); 8];
        for e in events {
            let mut slots = Vec::new();
            model.apply(e, |s| slots.push(s));
            slots.sort();
            for s in slots {
                got[s as usize].push(e.seq);
            }
        }
        got
    }

    #[test]
    fn rules_of_every_type() {
        // Slots: 0 -> user 1, 1 -> user 2, 2 -> user 3, 3 -> user 2 again (second device).
        let mut m = Model::new(10, &[(0, 1), (1, 2), (2, 3), (3, 2)]);
        let got = run(
            &mut m,
            &[
                ev(1, Kind::Follow, 1, 5),   // nobody connected is user 5
                ev(2, Kind::Follow, 2, 5),   //
                ev(3, Kind::Status, 5, 0),   // followers 1, 2 (two slots)
                ev(4, Kind::Unfollow, 1, 5), //
                ev(5, Kind::Status, 5, 0),   // follower 2 only
                ev(6, Kind::Private, 7, 3),  // slot 2
                ev(7, Kind::Broadcast, 0, 0),
                ev(8, Kind::Follow, 9, 2), // notifies user 2 (slots 1, 3); 9 is not local
                ev(9, Kind::Status, 9, 0), // nobody: the follower is not connected
                ev(10, Kind::Follow, 2, 5), // follow twice = once
                ev(11, Kind::Status, 5, 0),
                ev(12, Kind::Unfollow, 3, 5), // unfollow of a non-edge: nothing
                ev(13, Kind::Private, 1, 8),  // user 8 not connected: dropped
                ev(14, Kind::Status, 2, 0),
            ],
        );
        assert_eq!(got[0], vec![3, 7]);
        assert_eq!(got[1], vec![3, 5, 7, 8, 11]);
        assert_eq!(got[2], vec![6, 7]);
        assert_eq!(got[3], vec![3, 5, 7, 8, 11]);
    }

    #[test]
    fn dense_sets_behave_like_lists() {
        // 100 local users: follower sets go dense past 8 members.
        let clients: Vec<(u32, u64)> = (0..100).map(|i| (i, i as u64 + 1)).collect();
        let mut m = Model::new(200, &clients);
        for f in 1..=60 {
            m.apply(&ev(f, Kind::Follow, f, 150), |_| {});
        }
        for f in (1..=60).step_by(2) {
            m.apply(&ev(100 + f, Kind::Unfollow, f, 150), |_| {});
        }
        let mut slots = Vec::new();
        m.apply(&ev(500, Kind::Status, 150, 0), |s| slots.push(s));
        slots.sort();
        let want: Vec<u32> = (2..=60).step_by(2).map(|f| f as u32 - 1).collect();
        assert_eq!(slots, want);
    }
}
