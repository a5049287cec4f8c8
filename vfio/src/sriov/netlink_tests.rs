use super::*;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const NLMSG_ERROR: u16 = 2;
const IFLA_VFINFO_LIST: u16 = 22;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_VF_INFO: u16 = 1;
const IFLA_VF_MAC: u16 = 1;
const IFLA_VF_TRUST: u16 = 9;
/// Netlink attribute type bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Size of `struct nlmsghdr` and of `struct ifinfomsg`.
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

fn u16_at(buf: &[u8], offset: usize) -> u16 {
    u16::from_ne_bytes([buf[offset], buf[offset + 1]])
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes([
        buf[offset],
        buf[offset + 1],
        buf[offset + 2],
        buf[offset + 3],
    ])
}

/// The (type, value) of the netlink attribute at `offset`.
fn attribute(buf: &[u8], offset: usize) -> (u16, &[u8]) {
    let len = usize::from(u16_at(buf, offset));
    (
        u16_at(buf, offset + 2) & NLA_TYPE_MASK,
        &buf[offset + 4..offset + len],
    )
}

/// An `NLMSG_ERROR` answer to request `sequence` with errno `-code` (0: an acknowledgement).
fn error_message(sequence: u32, code: i32) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&(36u32).to_ne_bytes());
    buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&sequence.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&code.to_ne_bytes());
    // The request's header, as the kernel echoes it.
    buf.extend_from_slice(&[0u8; 16]);
    buf
}

/// The `RTM_NEWLINK` answer a PF with two VFs sends.
fn new_link_answer(sequence: u32) -> Vec<u8> {
    let vf = |id: u32, mac: [u8; 6], vlan: u32, spoofchk: bool, trust: bool| {
        LinkVfInfo(vec![
            VfInfo::Mac(VfInfoMac::new(id, &mac)),
            VfInfo::Vlan(VfInfoVlan::new(id, vlan, 0)),
            VfInfo::SpoofCheck(VfInfoSpoofCheck::new(id, spoofchk)),
            VfInfo::Trust(VfInfoTrust::new(id, trust)),
        ])
    };
    let mut link = LinkMessage::default();
    link.header.index = 3;
    link.attributes.push(LinkAttribute::IfName("eth0".into()));
    link.attributes.push(LinkAttribute::VfInfoList(vec![
        vf(0, [0; 6], 0, true, false),
        vf(1, [0x52, 0x54, 0, 0, 0, 0x11], 100, false, true),
    ]));
    serialize(RouteNetlinkMessage::NewLink(link), 0, sequence)
}

#[test]
fn set_mac_request_has_the_kernel_layout() {
    let mac = MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    let buf = set_vf_request(7, 3, VfSetting::Mac(mac), 42);

    assert_eq!(u32_at(&buf, 0) as usize, buf.len());
    assert_eq!(u16_at(&buf, 4), RTM_SETLINK);
    assert_eq!(u16_at(&buf, 6), NLM_F_REQUEST | NLM_F_ACK);
    assert_eq!(u32_at(&buf, 8), 42);
    assert_eq!(u32_at(&buf, NLMSG_HDRLEN + 4), 7, "ifinfomsg index");
    let (kind, list) = attribute(&buf, NLMSG_HDRLEN + IFINFOMSG_LEN);
    assert_eq!(kind, IFLA_VFINFO_LIST);
    let (kind, info) = attribute(list, 0);
    assert_eq!(kind, IFLA_VF_INFO);
    let (kind, value) = attribute(info, 0);
    assert_eq!(kind, IFLA_VF_MAC);
    // struct ifla_vf_mac { __u32 vf; __u8 mac[32]; }
    assert_eq!(value.len(), 36);
    assert_eq!(u32_at(value, 0), 3);
    assert_eq!(&value[4..10], &mac.0);
    assert!(value[10..].iter().all(|b| *b == 0));
}

#[test]
fn set_trust_request_carries_vf_and_switch() {
    let buf = set_vf_request(7, 5, VfSetting::Trust(true), 1);

    let (_, list) = attribute(&buf, NLMSG_HDRLEN + IFINFOMSG_LEN);
    let (_, info) = attribute(list, 0);
    let (kind, value) = attribute(info, 0);
    assert_eq!(kind, IFLA_VF_TRUST);
    // struct ifla_vf_trust { __u32 vf; __u32 setting; }
    assert_eq!((u32_at(value, 0), u32_at(value, 4)), (5, 1));
}

#[test]
fn set_request_round_trips_through_the_crate_parser() {
    let buf = set_vf_request(9, 2, VfSetting::Vlan { vlan: 300, qos: 4 }, 5);

    let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();

    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::SetLink(link)) = parsed.payload else {
        panic!("not a SetLink: {parsed:?}");
    };
    assert_eq!(link.header.index, 9);
    assert_eq!(
        link.attributes,
        vec![LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![
            VfInfo::Vlan(VfInfoVlan::new(2, 300, 4))
        ])])]
    );
}

#[test]
fn get_link_request_asks_for_vf_info_without_stats() {
    let buf = get_link_request(4, 8);

    assert_eq!(u16_at(&buf, 4), RTM_GETLINK);
    assert_eq!(u16_at(&buf, 6), NLM_F_REQUEST);
    assert_eq!(u32_at(&buf, NLMSG_HDRLEN + 4), 4);
    let (kind, value) = attribute(&buf, NLMSG_HDRLEN + IFINFOMSG_LEN);
    assert_eq!(kind, IFLA_EXT_MASK);
    // RTEXT_FILTER_VF | RTEXT_FILTER_SKIP_STATS
    assert_eq!(u32_at(value, 0), 1 | 8);
}

#[test]
fn vf_settings_are_read_from_the_matching_vf_entry() {
    let answer = new_link_answer(12);
    assert_eq!(u16_at(&answer, 4), RTM_NEWLINK);

    let settings = parse_vf_settings(&answer, 12, 1).unwrap();

    assert_eq!(
        settings,
        VfSettings {
            mac: MacAddress([0x52, 0x54, 0, 0, 0, 0x11]),
            vlan: 100,
            qos: 0,
            spoofchk: false,
            trust: true,
        }
    );
}

#[test]
fn vf_missing_from_the_answer_is_reported() {
    let answer = new_link_answer(12);

    let err = parse_vf_settings(&answer, 12, 5).unwrap_err();

    assert!(matches!(err, NetlinkError::NoSuchVf { vf: 5 }), "{err}");
}

#[test]
fn answers_to_other_requests_are_ignored() {
    let answer = new_link_answer(12);

    let err = parse_vf_settings(&answer, 13, 0).unwrap_err();

    assert!(matches!(err, NetlinkError::Decode(_)), "{err}");
}

#[test]
fn zero_error_code_is_an_acknowledgement() {
    assert!(parse_ack(&error_message(3, 0), 3).is_ok());
}

#[test]
fn negative_error_code_is_a_refusal_with_its_errno() {
    let err = parse_ack(&error_message(3, -libc::EOPNOTSUPP), 3).unwrap_err();

    let NetlinkError::Refused(io) = err else {
        panic!("not a refusal: {err}");
    };
    assert_eq!(io.raw_os_error(), Some(libc::EOPNOTSUPP));
}

#[test]
fn refused_get_link_is_a_refusal() {
    let err = parse_vf_settings(&error_message(4, -libc::ENODEV), 4, 0).unwrap_err();

    assert!(matches!(err, NetlinkError::Refused(_)), "{err}");
}

#[test]
fn truncated_answer_is_a_decode_error() {
    let answer = new_link_answer(12);

    let err = parse_vf_settings(&answer[..answer.len() / 2], 12, 0).unwrap_err();

    assert!(matches!(err, NetlinkError::Decode(_)), "{err}");
}

#[test]
fn garbage_answer_is_a_decode_error() {
    let err = parse_ack(&[0xff; 7], 1).unwrap_err();

    assert!(matches!(err, NetlinkError::Decode(_)), "{err}");
}
