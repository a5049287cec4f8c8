//! What the kernel answers rvmm's rtnetlink requests about a PF's VFs, as
//! `sriov::netlink::{parse_ack, parse_vf_settings}` read it. Two kinds of input: raw datagrams
//! (anything a socket could deliver: truncated headers, lengths that lie, nested attributes that
//! overrun), and well-formed `RTM_NEWLINK` answers built from arbitrary VF settings, with an
//! answer to another request in front of ours.
//!
//! Invariants: nothing panics; parsing is deterministic; the settings read from a well-formed
//! answer are exactly the ones of the asked VF in the answer to our request (the first entry with
//! its id; an answer to another request is never read), the VLAN and priority clamped to what
//! they fit in; an asked VF that is not listed is `NoSuchVf`.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::{
    LinkAttribute, LinkMessage, LinkVfInfo, VfInfo, VfInfoMac, VfInfoSpoofCheck, VfInfoTrust,
    VfInfoVlan,
};
use netlink_packet_route::RouteNetlinkMessage;
use rvmm_vfio::sriov::netlink::{parse_ack, parse_vf_settings, NetlinkError};
use rvmm_vfio::sriov::{MacAddress, VfSettings};

#[derive(Arbitrary, Debug)]
struct Vf {
    id: u8,
    mac: [u8; 6],
    vlan: u32,
    qos: u32,
    spoofchk: bool,
    trust: bool,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw {
        sequence: u32,
        vf: u16,
        datagram: Vec<u8>,
    },
    Answer {
        sequence: u32,
        asked: u8,
        ours: Vec<Vf>,
        other: Option<Vec<Vf>>,
    },
}

fn new_link(vfs: &[Vf], sequence: u32) -> Vec<u8> {
    let list = vfs
        .iter()
        .map(|v| {
            let id = u32::from(v.id);
            LinkVfInfo(vec![
                VfInfo::Mac(VfInfoMac::new(id, &v.mac)),
                VfInfo::Vlan(VfInfoVlan::new(id, v.vlan, v.qos)),
                VfInfo::SpoofCheck(VfInfoSpoofCheck::new(id, v.spoofchk)),
                VfInfo::Trust(VfInfoTrust::new(id, v.trust)),
            ])
        })
        .collect();
    let mut link = LinkMessage::default();
    link.header.index = 3;
    link.attributes.push(LinkAttribute::IfName("eth0".into()));
    link.attributes.push(LinkAttribute::VfInfoList(list));
    let mut header = NetlinkHeader::default();
    header.sequence_number = sequence;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::NewLink(link)),
    );
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

fn settings(v: &Vf) -> VfSettings {
    VfSettings {
        mac: MacAddress(v.mac),
        vlan: u16::try_from(v.vlan).unwrap_or(u16::MAX),
        qos: u8::try_from(v.qos).unwrap_or(u8::MAX),
        spoofchk: v.spoofchk,
        trust: v.trust,
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw {
            sequence,
            vf,
            datagram,
        } => {
            let ack = format!("{:?}", parse_ack(&datagram, sequence));
            let read = format!("{:?}", parse_vf_settings(&datagram, sequence, vf));
            assert_eq!(ack, format!("{:?}", parse_ack(&datagram, sequence)));
            assert_eq!(
                read,
                format!("{:?}", parse_vf_settings(&datagram, sequence, vf))
            );
        }
        Input::Answer {
            sequence,
            asked,
            ours,
            other,
        } => {
            let mut datagram = Vec::new();
            if let Some(other) = &other {
                datagram.extend(new_link(other, sequence.wrapping_add(1)));
            }
            datagram.extend(new_link(&ours, sequence));
            let read = parse_vf_settings(&datagram, sequence, u16::from(asked));
            match ours.iter().find(|v| v.id == asked) {
                Some(v) => assert_eq!(read.ok(), Some(settings(v)), "{ours:?}"),
                None => assert!(
                    matches!(read, Err(NetlinkError::NoSuchVf { vf }) if vf == u16::from(asked)),
                    "{read:?}"
                ),
            }
        }
    }
});
