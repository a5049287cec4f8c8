//! VF port settings through rtnetlink, as `ip link set PF vf N ...` does it: `RTM_GETLINK` with
//! `RTEXT_FILTER_VF` reads every VF's MAC address, VLAN, spoof checking and trust from the PF
//! driver; `RTM_SETLINK` with one `IFLA_VFINFO_LIST` entry changes one setting of one VF, so a
//! refusal names the setting. Synchronous: the kernel answers inside `send`.
//!
//! Message building and parsing are plain functions over byte buffers, tested without a kernel.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkMessage, LinkVfInfo, VfInfo, VfInfoMac, VfInfoSpoofCheck,
    VfInfoTrust, VfInfoVlan,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;

use super::policy::{MacAddress, VfSetting, VfSettings};

/// Errors of talking rtnetlink.
#[derive(Debug, Error)]
pub enum NetlinkError {
    /// No rtnetlink socket.
    #[error("cannot open an rtnetlink socket")]
    Socket(#[source] io::Error),
    /// Sending or receiving failed.
    #[error("rtnetlink {action} failed")]
    Io {
        /// "send" or "receive".
        action: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel (or the PF driver) refused the request.
    #[error("rtnetlink request refused")]
    Refused(#[source] io::Error),
    /// The answer is not what rtnetlink sends.
    #[error("cannot decode the rtnetlink answer: {0}")]
    Decode(String),
    /// The PF reports no settings for the VF.
    #[error("the physical function reports no settings for VF {vf} (its driver may not support configuring VFs)")]
    NoSuchVf {
        /// The VF index.
        vf: u16,
    },
}

/// Result of rtnetlink calls.
pub type Result<T> = std::result::Result<T, NetlinkError>;

/// Reads and changes the port settings of a PF's VFs.
pub trait VfControl: Send + Sync {
    /// The current settings of VF `vf` of the PF with interface index `ifindex`.
    fn settings(&self, ifindex: u32, vf: u16) -> Result<VfSettings>;
    /// Applies `setting` to VF `vf` of the PF with interface index `ifindex`.
    fn apply(&self, ifindex: u32, vf: u16, setting: VfSetting) -> Result<()>;
}

/// [`VfControl`] through the kernel's rtnetlink (a socket per call; needs CAP_NET_ADMIN to
/// change settings).
#[derive(Debug, Default)]
pub struct RouteNetlink {
    sequence: AtomicU32,
}

impl RouteNetlink {
    /// The kernel's rtnetlink.
    pub fn new() -> Self {
        Self::default()
    }

    fn next_sequence(&self) -> u32 {
        self.sequence
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
    }

    /// Sends `request` and returns the datagram that answers it.
    fn exchange(&self, request: &[u8]) -> Result<Vec<u8>> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        let io_err = |action| move |source| NetlinkError::Io { action, source };
        socket.send(request, 0).map_err(io_err("send"))?;
        // Peek with MSG_TRUNC for the datagram's full size, then read it whole.
        let mut probe = [0u8; 16];
        let size = socket
            .recv(&mut &mut probe[..], libc::MSG_PEEK | libc::MSG_TRUNC)
            .map_err(io_err("receive"))?;
        let mut buf = vec![0u8; size.max(probe.len())];
        let got = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(io_err("receive"))?;
        buf.truncate(got.min(buf.len()));
        Ok(buf)
    }
}

impl VfControl for RouteNetlink {
    fn settings(&self, ifindex: u32, vf: u16) -> Result<VfSettings> {
        let sequence = self.next_sequence();
        let answer = self.exchange(&get_link_request(ifindex, sequence))?;
        parse_vf_settings(&answer, sequence, vf)
    }

    fn apply(&self, ifindex: u32, vf: u16, setting: VfSetting) -> Result<()> {
        let sequence = self.next_sequence();
        let answer = self.exchange(&set_vf_request(ifindex, vf, setting, sequence))?;
        parse_ack(&answer, sequence)
    }
}

fn serialize(message: RouteNetlinkMessage, flags: u16, sequence: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// `RTM_GETLINK` for interface `ifindex`, asking for its VFs' settings without their counters.
pub fn get_link_request(ifindex: u32, sequence: u32) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    link.attributes.push(LinkAttribute::ExtMask(vec![
        LinkExtentMask::Vf,
        LinkExtentMask::SkipStats,
    ]));
    serialize(RouteNetlinkMessage::GetLink(link), NLM_F_REQUEST, sequence)
}

/// `RTM_SETLINK` on interface `ifindex` applying `setting` to VF `vf`, acknowledged.
pub fn set_vf_request(ifindex: u32, vf: u16, setting: VfSetting, sequence: u32) -> Vec<u8> {
    let vf_id = u32::from(vf);
    let info = match setting {
        VfSetting::Mac(mac) => VfInfo::Mac(VfInfoMac::new(vf_id, &mac.0)),
        VfSetting::Vlan { vlan, qos } => {
            VfInfo::Vlan(VfInfoVlan::new(vf_id, u32::from(vlan), u32::from(qos)))
        }
        VfSetting::SpoofCheck(on) => VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf_id, on)),
        VfSetting::Trust(on) => VfInfo::Trust(VfInfoTrust::new(vf_id, on)),
    };
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    link.attributes
        .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![info])]));
    serialize(
        RouteNetlinkMessage::SetLink(link),
        NLM_F_REQUEST | NLM_F_ACK,
        sequence,
    )
}

/// The messages of one datagram.
fn messages(datagram: &[u8]) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut messages = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
            .map_err(|e| NetlinkError::Decode(e.to_string()))?;
        // Messages are 4-byte aligned inside a datagram.
        let len = (message.header.length as usize + 3) & !3;
        if len == 0 {
            return Err(NetlinkError::Decode("a message of length 0".into()));
        }
        messages.push(message);
        rest = rest.get(len..).unwrap_or_default();
    }
    Ok(messages)
}

/// The acknowledgement of request `sequence` in `datagram`: `Ok` or the errno the kernel
/// answered with.
pub fn parse_ack(datagram: &[u8], sequence: u32) -> Result<()> {
    for message in messages(datagram)? {
        if message.header.sequence_number != sequence {
            continue;
        }
        if let NetlinkPayload::Error(e) = message.payload {
            return match e.code {
                None => Ok(()),
                Some(_) => Err(NetlinkError::Refused(e.to_io())),
            };
        }
    }
    Err(NetlinkError::Decode(format!(
        "no acknowledgement of request {sequence}"
    )))
}

/// The settings of VF `vf` in the `RTM_NEWLINK` answer to request `sequence`.
pub fn parse_vf_settings(datagram: &[u8], sequence: u32, vf: u16) -> Result<VfSettings> {
    for message in messages(datagram)? {
        if message.header.sequence_number != sequence {
            continue;
        }
        match message.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(NetlinkError::Refused(e.to_io()))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                return vf_settings(&link, vf);
            }
            _ => {}
        }
    }
    Err(NetlinkError::Decode(format!(
        "no link in the answer to request {sequence}"
    )))
}

/// VF `vf`'s settings among the `IFLA_VFINFO_LIST` of `link`.
fn vf_settings(link: &LinkMessage, vf: u16) -> Result<VfSettings> {
    let vf_id = u32::from(vf);
    let infos = link.attributes.iter().filter_map(|a| match a {
        LinkAttribute::VfInfoList(list) => Some(list),
        _ => None,
    });
    for LinkVfInfo(info) in infos.flatten() {
        let is_ours = info
            .iter()
            .any(|i| matches!(i, VfInfo::Mac(m) if m.vf_id == vf_id));
        if !is_ours {
            continue;
        }
        let mut settings = VfSettings::default();
        for item in info {
            match item {
                VfInfo::Mac(m) => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&m.mac[..6]);
                    settings.mac = MacAddress(mac);
                }
                VfInfo::Vlan(v) => {
                    settings.vlan = u16::try_from(v.vlan_id).unwrap_or(u16::MAX);
                    settings.qos = u8::try_from(v.qos).unwrap_or(u8::MAX);
                }
                VfInfo::SpoofCheck(s) => settings.spoofchk = s.enabled,
                VfInfo::Trust(t) => settings.trust = t.enabled,
                _ => {}
            }
        }
        return Ok(settings);
    }
    Err(NetlinkError::NoSuchVf { vf })
}

#[cfg(test)]
#[path = "netlink_tests.rs"]
mod tests;
