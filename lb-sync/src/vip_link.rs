//! VIP ownership on the host: the served VIPs as addresses of a link of ringlb's own (`--vip-link`),
//! so that the kernel takes their traffic as local (ARP answers, routes through the node, sockets
//! bound without `IP_FREEBIND`), added and removed through netlink as Services come and go.
//!
//! The link is found by name or created (kind `dummy`, or a port-less `bridge` where the kernel
//! has no dummy driver) and brought up; or it is a TUN interface of this process (kind `tun`,
//! [`crate::liveness_link`]), which the kernel deletes with every address on it when the process
//! ends however it ends: a ringlb that crashed or was SIGKILLed leaves no VIP behind for its node
//! to keep answering ARP for while a peer has taken it over. Each VIP is a host address (/32, /128; IPv6 without
//! duplicate address detection, which a link without carrier would never finish).
//!
//! Invariants:
//! - ringlb adds and removes only addresses it tags with [`ADDRESS_PROTOCOL`] (iproute2 6.2 and
//!   later show `proto 0x52`): an address an operator put on the link, even one equal to a VIP, is never
//!   touched, and the tag lets a restarted ringlb find the addresses a previous run left behind;
//! - [`VipLink::close`] removes every tagged address, and deletes the link only if this process
//!   created it;
//! - a failed change is retried by the next [`VipLink::set`] (the wanted set is always compared
//!   with the link as it is), and never costs the addresses that are already right.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::{Handle, LinkBridge, LinkDummy, LinkUnspec};
use tokio::sync::watch;

use crate::announce::{self, Announcer};
use crate::follow::{Apply, follow};
#[cfg(doc)]
use crate::follow::{LOG_EVERY, RETRY_AFTER};
use crate::liveness_link::{LivenessLink, LivenessLinkError};

/// The `IFA_PROTO` value of ringlb's addresses (`'R'`): how it knows which addresses are its own.
pub const ADDRESS_PROTOCOL: u8 = 0x52;

/// The kind of link ringlb creates when none of its name exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkKind {
    /// A `dummy` link, as kube-proxy's IPVS mode uses (`kube-ipvs0`).
    #[default]
    Dummy,
    /// A bridge without ports: for kernels without the dummy driver.
    Bridge,
    /// A TUN interface that lives exactly as long as this process (never adopted: created anew).
    Tun,
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkKind::Dummy => "dummy",
            LinkKind::Bridge => "bridge",
            LinkKind::Tun => "tun",
        })
    }
}

/// Which link holds the VIPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipLinkConfig {
    pub name: String,
    pub kind: LinkKind,
}

#[derive(Debug, thiserror::Error)]
pub enum VipLinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Tun(#[from] LivenessLinkError),
    #[error("link {link}: {operation}: {error}")]
    Netlink {
        link: String,
        operation: String,
        #[source]
        error: rtnetlink::Error,
    },
}

/// The link and the addresses ringlb holds on it. See the module doc.
pub struct VipLink {
    handle: Handle,
    name: String,
    index: u32,
    created: bool,
    /// The tagged addresses on the link, as last listed or changed.
    ours: BTreeSet<IpAddr>,
    /// Added since [`VipLink::take_added`] last took them.
    added: Vec<IpAddr>,
    /// `ours`, for whoever must know what is on the link (L2 agreement tells its peers only
    /// once what it let go is gone).
    held: watch::Sender<BTreeSet<IpAddr>>,
    connection: tokio::task::JoinHandle<()>,
    /// For [`LinkKind::Tun`]: the descriptor whose closing deletes the link.
    _tun: Option<LivenessLink>,
}

impl VipLink {
    /// Finds or creates the link, brings it up and adopts the tagged addresses already on it.
    pub async fn open(config: &VipLinkConfig) -> Result<VipLink, VipLinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(VipLinkError::Socket)?;
        let connection = tokio::spawn(connection);
        let name = config.name.clone();
        let fail = |operation: &str| {
            let (link, operation) = (name.clone(), operation.to_owned());
            move |error| VipLinkError::Netlink { link, operation, error }
        };
        // A TUN link is this process's own: one of that name that exists is another's.
        let tun = match config.kind {
            LinkKind::Tun => Some(LivenessLink::open(&name).await?),
            LinkKind::Dummy | LinkKind::Bridge => None,
        };
        let (index, created) = match link_index(&handle, &name).await.map_err(fail("look up"))? {
            Some(index) => (index, tun.is_some()),
            None if tun.is_some() => {
                return Err(fail("look up the TUN link just made")(rtnetlink::Error::RequestFailed));
            }
            None => {
                let message = match config.kind {
                    LinkKind::Dummy => LinkDummy::new(&name).up().build(),
                    // (A TUN link was made above.)
                    LinkKind::Bridge | LinkKind::Tun => LinkBridge::new(&name).up().build(),
                };
                handle
                    .link()
                    .add(message)
                    .execute()
                    .await
                    .map_err(fail(&format!("create a {} link", config.kind)))?;
                let index = link_index(&handle, &name).await.map_err(fail("look up"))?;
                (index.ok_or_else(|| fail("look up")(rtnetlink::Error::RequestFailed))?, true)
            }
        };
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(fail("bring up"))?;
        let (ours, added, held) = (BTreeSet::new(), Vec::new(), watch::Sender::new(BTreeSet::new()));
        let mut link = VipLink { handle, name, index, created, ours, added, held, connection, _tun: tun };
        link.ours = tagged(link.list().await?).into_iter().map(|(address, _)| address).collect();
        link.held.send_replace(link.ours.clone());
        tracing::info!(link = %link.name, created, adopted = link.ours.len(), "VIP link ready");
        Ok(link)
    }

    /// The addresses added since the last call (what is to be announced).
    pub fn take_added(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut self.added)
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The addresses ringlb holds on the link.
    pub fn addresses(&self) -> &BTreeSet<IpAddr> {
        &self.ours
    }

    /// [`VipLink::addresses`] as they change (after each [`VipLink::set`]).
    pub fn held(&self) -> watch::Receiver<BTreeSet<IpAddr>> {
        self.held.subscribe()
    }

    /// Makes the tagged addresses `wanted`: adds what is missing, removes what is no longer
    /// wanted. Goes on past a failed address; the first failure is returned once all were tried
    /// (the next call tries the rest again). What was added, failure or not, waits in
    /// [`VipLink::take_added`].
    pub async fn set(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<(), VipLinkError> {
        let mut first_error = None;
        // One listing serves both passes: what is removed here is not wanted, so never re-added.
        let messages = self.list().await?;
        let present: BTreeSet<IpAddr> = messages.iter().filter_map(address_of).collect();
        let tagged = tagged(messages);
        self.ours = tagged.iter().map(|(address, _)| *address).collect();
        for (address, message) in tagged {
            if wanted.contains(&address) {
                continue;
            }
            match self.handle.address().del(message).execute().await {
                Ok(()) => {
                    self.ours.remove(&address);
                    tracing::debug!(link = %self.name, %address, "VIP address removed");
                }
                Err(error) => {
                    first_error = first_error.or(Some(self.error(&format!("remove {address}"), error)))
                }
            }
        }
        for &address in wanted {
            if present.contains(&address) {
                continue;
            }
            match self.add(address).await {
                Ok(()) => {
                    self.ours.insert(address);
                    self.added.push(address);
                    tracing::debug!(link = %self.name, %address, "VIP address added");
                }
                Err(error) => {
                    first_error = first_error.or(Some(self.error(&format!("add {address}"), error)))
                }
            }
        }
        let ours = &self.ours;
        self.held.send_if_modified(|held| {
            let changed = held != ours;
            if changed {
                held.clone_from(ours);
            }
            changed
        });
        first_error.map_or(Ok(()), Err)
    }

    /// Removes every tagged address, then the link if this process created it.
    pub async fn close(mut self) -> Result<(), VipLinkError> {
        let cleared = self.set(&BTreeSet::new()).await;
        let deleted = if self.created {
            let deleted = self.handle.link().del(self.index).execute().await;
            deleted.map_err(|error| self.error("delete", error))
        } else {
            Ok(())
        };
        self.connection.abort();
        tracing::info!(link = %self.name, deleted = self.created, "VIP link released");
        cleared.and(deleted)
    }

    async fn add(&self, address: IpAddr) -> Result<(), rtnetlink::Error> {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        let mut request = self.handle.address().add(self.index, address, prefix);
        let message = request.message_mut();
        message.attributes.push(AddressAttribute::Protocol(AddressProtocol::Other(ADDRESS_PROTOCOL)));
        if address.is_ipv6() {
            message.header.flags |= AddressHeaderFlags::Nodad;
            message.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request.execute().await
    }

    async fn list(&self) -> Result<Vec<AddressMessage>, VipLinkError> {
        let request = self.handle.address().get().set_link_index_filter(self.index).execute();
        request.try_collect().await.map_err(|error| self.error("list addresses", error))
    }

    fn error(&self, operation: &str, error: rtnetlink::Error) -> VipLinkError {
        VipLinkError::Netlink { link: self.name.clone(), operation: operation.to_owned(), error }
    }
}

/// Keeps the link's addresses equal to `addresses` of what `wanted` holds (e.g. [`vip_addresses`]
/// of the published snapshot) until `stop` resolves, then closes the link (see
/// [`VipLink::close`]). Netlink is asked only when the addresses differ from those last set; a
/// failed change is logged (the same failure at most every [`LOG_EVERY`]) and retried after
/// [`RETRY_AFTER`]. With an `announcer`, each address added is announced to the neighbours
/// ([`crate::announce`]).
pub async fn run<T>(
    mut link: VipLink,
    announcer: Option<Arc<Announcer>>,
    wanted: watch::Receiver<T>,
    addresses: impl Fn(&T) -> BTreeSet<IpAddr>,
    stop: impl Future,
) {
    let mut announced = Announced { link: &mut link, announcer };
    follow(wanted, addresses, &mut announced, "cannot update the VIP link", stop).await;
    if let Err(error) = link.close().await {
        tracing::warn!(%error, "cannot release the VIP link");
    }
}

/// The VIP link with whoever announces what is added to it.
struct Announced<'a> {
    link: &'a mut VipLink,
    announcer: Option<Arc<Announcer>>,
}

impl Apply<BTreeSet<IpAddr>> for Announced<'_> {
    type Error = VipLinkError;

    async fn apply(&mut self, target: &BTreeSet<IpAddr>) -> Result<(), VipLinkError> {
        let outcome = self.link.set(target).await;
        // Also after a partial failure: what went onto the link is announced.
        let added = self.link.take_added();
        if let Some(announcer) = &self.announcer {
            tokio::spawn(announce(Arc::clone(announcer), added));
        }
        outcome
    }
}

/// Announces `added` [`announce::REPEATS`] times, [`announce::SPACING`] apart; logs the first
/// failure of each batch.
async fn announce(announcer: Arc<Announcer>, added: Vec<IpAddr>) {
    if added.is_empty() {
        return;
    }
    let mut failed = false;
    for round in 0..announce::REPEATS {
        if round > 0 {
            tokio::time::sleep(announce::SPACING).await;
        }
        for &vip in &added {
            if let Err(error) = announcer.announce(vip)
                && !std::mem::replace(&mut failed, true)
            {
                tracing::warn!(interface = announcer.interface(), %vip, %error, "cannot announce a VIP");
            }
        }
    }
    tracing::debug!(interface = announcer.interface(), vips = added.len(), "VIPs announced");
}

/// The VIP addresses of a snapshot: what the link should hold.
pub fn vip_addresses(snapshot: &lb_core::Snapshot) -> BTreeSet<IpAddr> {
    snapshot.keys().map(|key| key.addr).collect()
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|link| link.header.index)),
        // The kernel answers a name it does not know with ENODEV.
        Err(rtnetlink::Error::NetlinkError(message)) if message.raw_code() == -libc::ENODEV => Ok(None),
        Err(error) => Err(error),
    }
}

fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the address itself where it differs from IFA_ADDRESS (the peer, on point-to-point
    // links); on the links ringlb uses they are equal, and IPv6 carries only IFA_ADDRESS.
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(address) => Some(*address),
        _ => None,
    });
    local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(address) => Some(*address),
            _ => None,
        })
    })
}

/// The tagged addresses of a listing, each with the message that deletes it.
fn tagged(messages: Vec<AddressMessage>) -> Vec<(IpAddr, AddressMessage)> {
    messages.into_iter().filter(is_ours).filter_map(|m| Some((address_of(&m)?, m))).collect()
}

fn is_ours(message: &AddressMessage) -> bool {
    message
        .attributes
        .iter()
        .any(|a| matches!(a, AddressAttribute::Protocol(AddressProtocol::Other(p)) if *p == ADDRESS_PROTOCOL))
}
