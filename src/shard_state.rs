//! The state of one shard that its command loop (`shard.rs`), its client writers
//! (`client.rs`) and the output budget (`output_budget.rs`) share on the shard's executor: the
//! router, whose client slots carry each client's [`ClientIo`], and the count of writers still
//! running. A module of its own so that those three depend on it rather than on each other.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use crate::client_io::{ClientIo, CloseMode};
use crate::notify::Notify;
use crate::router::{ClientId, Router};
use crate::shared::Shared;

/// The state of one shard, shared by its command loop and its client tasks.
pub struct ShardState {
    /// Routing state, output buffers, and each client's I/O handle in its slot.
    pub router: RefCell<Router<Rc<ClientIo>>>,
    /// Client tasks still running (writers).
    pub live_writers: Cell<usize>,
    /// Notified when the last writer ends.
    pub writers_done: Notify,
    /// Server-wide configuration and counters.
    pub shared: Arc<Shared>,
    index: usize,
}

impl ShardState {
    /// The state of shard `index` of a server.
    pub fn new(index: usize, shared: Arc<Shared>) -> Self {
        let config = &shared.config;
        ShardState {
            router: RefCell::new(Router::new(index, config.cores, config.max_client_backlog)),
            live_writers: Cell::new(0),
            writers_done: Notify::default(),
            shared,
            index,
        }
    }

    /// This shard's delivery latency histogram.
    pub fn delivery_latency(&self) -> &crate::latency::DeliveryLatency {
        &self.shared.delivery_latency[self.index]
    }

    /// The I/O handle of a client, while its writer runs.
    pub fn io(&self, client: ClientId) -> Option<Rc<ClientIo>> {
        self.router.borrow().handle(client).cloned()
    }

    /// Takes a client out of routing and asks its writer to close it.
    pub fn close_client(&self, client: ClientId, mode: CloseMode) {
        let io = {
            let mut router = self.router.borrow_mut();
            router.detach(client);
            router.handle(client).cloned()
        };
        if let Some(io) = io {
            io.close(mode);
        }
    }
}
