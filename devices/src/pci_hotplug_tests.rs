use super::*;
use crate::test_utils::RecordingInterrupt;

fn fixture(slots: usize) -> (PciHotplug, Arc<RecordingInterrupt>) {
    let wake = Arc::new(RecordingInterrupt::default());
    (PciHotplug::new(slots, wake.clone()), wake)
}

fn read(block: &mut PciHotplug, offset: u64) -> u32 {
    let mut data = [0xffu8; 4];
    block.read(0, offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(block: &mut PciHotplug, offset: u64, value: u32) {
    block.write(0, offset, &value.to_le_bytes());
}

#[test]
fn insertion_sets_presence_and_a_device_check_read_once() {
    let (mut b, _) = fixture(8);
    b.device_inserted(3);

    assert!(b.pending(3));
    assert_eq!(read(&mut b, UP_OFFSET), 1 << 3);
    assert_eq!(read(&mut b, UP_OFFSET), 0);
    assert!(!b.pending(3));
    assert_eq!(read(&mut b, PRESENT_OFFSET), 1 << 3);
    assert_eq!(read(&mut b, PRESENT_OFFSET), 1 << 3);
}

#[test]
fn reading_notifications_wakes_the_vmm_and_reading_presence_does_not() {
    let (mut b, wake) = fixture(8);
    b.device_inserted(0);
    read(&mut b, PRESENT_OFFSET);
    assert_eq!(wake.count(), 0);
    read(&mut b, UP_OFFSET);
    assert_eq!(wake.count(), 1);
    read(&mut b, UP_OFFSET);
    assert_eq!(wake.count(), 1);
}

#[test]
fn slots_above_31_are_in_later_dwords() {
    let (mut b, _) = fixture(128);
    b.device_inserted(33);
    b.device_inserted(127);

    assert_eq!(read(&mut b, UP_OFFSET), 0);
    assert_eq!(read(&mut b, UP_OFFSET + 4), 1 << 1);
    assert_eq!(read(&mut b, UP_OFFSET + 12), 1 << 31);
    // Reading dword 1 did not clear dword 3.
    assert_eq!(read(&mut b, UP_OFFSET + 12), 0);
}

#[test]
fn reading_one_dword_keeps_the_others() {
    let (mut b, _) = fixture(64);
    b.device_inserted(0);
    b.device_inserted(40);

    assert_eq!(read(&mut b, UP_OFFSET), 1);
    assert!(b.pending(40));
    assert_eq!(read(&mut b, UP_OFFSET + 4), 1 << 8);
}

#[test]
fn eject_request_is_read_from_pcid() {
    let (mut b, _) = fixture(8);
    b.set_present_at_boot(2);
    b.request_eject(2);

    assert_eq!(read(&mut b, UP_OFFSET), 0);
    assert_eq!(read(&mut b, DOWN_OFFSET), 1 << 2);
    assert_eq!(read(&mut b, DOWN_OFFSET), 0);
}

#[test]
fn surprise_removal_clears_presence_and_pending_events_and_sets_bus_check() {
    let (mut b, _) = fixture(8);
    b.device_inserted(1);
    b.request_eject(1);
    b.device_gone(1);

    assert_eq!(read(&mut b, PRESENT_OFFSET), 0);
    assert_eq!(read(&mut b, UP_OFFSET), 0);
    assert_eq!(read(&mut b, DOWN_OFFSET), 0);
    assert_eq!(read(&mut b, BUS_CHECK_OFFSET), 1 << 1);
    assert_eq!(read(&mut b, BUS_CHECK_OFFSET), 0);
}

#[test]
fn reinsertion_replaces_a_pending_bus_check() {
    let (mut b, _) = fixture(8);
    b.device_inserted(1);
    b.device_gone(1);
    b.device_inserted(1);

    assert_eq!(read(&mut b, BUS_CHECK_OFFSET), 0);
    assert_eq!(read(&mut b, UP_OFFSET), 1 << 1);
}

#[test]
fn ejection_clears_presence_without_a_notification() {
    let (mut b, _) = fixture(8);
    b.set_present_at_boot(4);
    b.request_eject(4);
    b.device_ejected(4);

    assert!(!b.present(4));
    assert!(!b.pending(4));
    assert_eq!(read(&mut b, BUS_CHECK_OFFSET), 0);
}

#[test]
fn presence_is_read_only() {
    let (mut b, _) = fixture(8);
    b.set_present_at_boot(0);
    write(&mut b, PRESENT_OFFSET, 0);

    assert_eq!(read(&mut b, PRESENT_OFFSET), 1);
    assert!(b.take_actions().is_empty());
}

#[test]
fn ej0_write_is_queued_and_wakes_the_vmm() {
    let (mut b, wake) = fixture(8);
    write(&mut b, EJECT_OFFSET, 5);

    assert_eq!(wake.count(), 1);
    assert_eq!(b.take_actions(), vec![GuestAction::Ejected(5)]);
    assert!(b.take_actions().is_empty());
}

#[test]
fn ost_write_is_decoded() {
    let (mut b, wake) = fixture(8);
    write(&mut b, OST_OFFSET, (7 << 16) | (0x80 << 8) | 3);

    assert_eq!(wake.count(), 1);
    assert_eq!(
        b.take_actions(),
        vec![GuestAction::Ost(OstReport {
            slot: 7,
            event: NOTIFY_EJECT_REQUEST,
            status: 0x80,
        })]
    );
}

#[test]
fn actions_of_slots_that_do_not_exist_are_ignored() {
    let (mut b, wake) = fixture(4);
    write(&mut b, EJECT_OFFSET, 4);
    write(&mut b, OST_OFFSET, 200 << 16);

    assert_eq!(wake.count(), 0);
    assert!(b.take_actions().is_empty());
}

#[test]
fn bad_widths_and_offsets_read_zero_and_clear_nothing() {
    let (mut b, _) = fixture(8);
    b.device_inserted(0);
    let mut byte = [0xffu8];
    b.read(0, UP_OFFSET, &mut byte);
    assert_eq!(byte, [0]);
    assert_eq!(read(&mut b, EJECT_OFFSET), 0);
    assert_eq!(read(&mut b, UP_OFFSET + 2), 0);
    assert!(b.pending(0));
    b.write(0, EJECT_OFFSET, &[1, 0]);
    assert!(b.take_actions().is_empty());
}

#[test]
fn slots_beyond_the_block_are_ignored() {
    let (mut b, _) = fixture(2);
    b.device_inserted(2);
    b.set_present_at_boot(200);

    assert!(!b.pending(2));
    assert_eq!(read(&mut b, PRESENT_OFFSET), 0);
}

#[test]
fn reset_drops_notifications_and_actions_and_keeps_presence() {
    let (mut b, _) = fixture(8);
    b.device_inserted(1);
    write(&mut b, EJECT_OFFSET, 1);
    b.reset();

    assert!(!b.pending(1));
    assert!(b.present(1));
    assert!(b.take_actions().is_empty());
}

#[test]
fn the_action_queue_is_bounded() {
    let (mut b, _) = fixture(8);
    for _ in 0..(MAX_QUEUED + 5) {
        write(&mut b, EJECT_OFFSET, 1);
    }
    assert_eq!(b.take_actions().len(), MAX_QUEUED);
}
