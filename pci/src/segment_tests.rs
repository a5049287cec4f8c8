use super::*;
use crate::msi::tests::RecordingSender;
use crate::root_port::slot::tests::{NullEvents, TestDevice};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

pub(crate) fn config(ports: usize) -> SegmentConfig {
    SegmentConfig {
        ecam_base: 0xe000_0000,
        bus_start: 0,
        bus_end: 0xff,
        mmio32: AddressRange::new(0xc000_0000, 512 * MIB),
        mmio64: AddressRange::new(0x100_0000_0000, 256 * GIB),
        mmio64_per_port: None,
        mmio64_minimums: Vec::new(),
        io: AddressRange::new(0x1000, 0xf000),
        root_ports: ports,
        link_speed: LinkSpeed::Gen4,
        link_width: LinkWidth::X16,
        root_buses: 1,
    }
}

pub(crate) fn segment(ports: usize) -> PciSegment {
    PciSegment::new(
        config(ports),
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    )
    .unwrap()
}

fn assert_split_is_valid(windows: &[PortWindows], cfg: &SegmentConfig) {
    for (i, w) in windows.iter().enumerate() {
        assert_eq!(w.mmio32.base % MIB, 0, "port {i}");
        assert_eq!(w.mmio32.size % MIB, 0, "port {i}");
        assert!(cfg.mmio32.contains_range(&w.mmio32), "port {i}");
        assert!(w.mmio64.size.is_power_of_two(), "port {i}");
        assert_eq!(w.mmio64.base % w.mmio64.size, 0, "port {i}");
        assert!(cfg.mmio64.contains_range(&w.mmio64), "port {i}");
        if let Some(next) = windows.get(i + 1) {
            assert!(w.mmio32.last().unwrap() < next.mmio32.base);
            assert!(w.mmio64.last().unwrap() < next.mmio64.base);
        }
    }
}

#[test]
fn split_for_one_port_gives_it_everything() {
    let cfg = config(1);
    let w = split_windows(cfg.mmio32, cfg.mmio64, 1).unwrap();
    assert_eq!(
        w,
        vec![PortWindows {
            mmio32: cfg.mmio32,
            mmio64: cfg.mmio64,
            io: None,
        }]
    );
}

#[test]
fn split_for_8_ports_is_even_and_aligned() {
    let cfg = config(8);
    let w = split_windows(cfg.mmio32, cfg.mmio64, 8).unwrap();
    assert_eq!(w.len(), 8);
    assert!(w
        .iter()
        .all(|p| p.mmio32.size == 64 * MIB && p.mmio64.size == 32 * GIB));
    assert_eq!(w[7].mmio32.base, 0xc000_0000 + 7 * 64 * MIB);
    assert_split_is_valid(&w, &cfg);
}

#[test]
fn split_for_32_ports_is_even_and_aligned() {
    let cfg = config(32);
    let w = split_windows(cfg.mmio32, cfg.mmio64, 32).unwrap();
    assert!(w
        .iter()
        .all(|p| p.mmio32.size == 16 * MIB && p.mmio64.size == 8 * GIB));
    assert_split_is_valid(&w, &cfg);
}

#[test]
fn split_for_128_ports_is_even_and_aligned() {
    let cfg = config(128);
    let w = split_windows(cfg.mmio32, cfg.mmio64, 128).unwrap();
    assert_eq!(w.len(), 128);
    assert!(w
        .iter()
        .all(|p| p.mmio32.size == 4 * MIB && p.mmio64.size == 2 * GIB));
    assert_split_is_valid(&w, &cfg);
}

#[test]
fn split_rounds_uneven_windows_down() {
    let mmio32 = AddressRange::new(0xc008_0000, 100 * MIB);
    let mmio64 = AddressRange::new(0x1_2000_0000, 3 * GIB);
    let w = split_windows(mmio32, mmio64, 3).unwrap();
    assert!(w.iter().all(|p| p.mmio32.size == 33 * MIB));
    assert_eq!(w[0].mmio32.base, 0xc010_0000);
    assert!(w.iter().all(|p| p.mmio64.size == 512 * MIB));
    assert_split_is_valid(
        &w,
        &SegmentConfig {
            mmio32,
            mmio64,
            ..config(3)
        },
    );
}

#[test]
fn split_steps_down_when_alignment_wastes_space() {
    // 4 GiB starting 1 GiB past a 2 GiB boundary: two 2 GiB windows do not fit aligned.
    let mmio64 = AddressRange::new(0x1_4000_0000, 4 * GIB);
    let w = split_windows(config(2).mmio32, mmio64, 2).unwrap();
    assert!(w.iter().all(|p| p.mmio64.size == GIB));
    assert_eq!(w[0].mmio64.base, 0x1_4000_0000);
}

#[test]
fn split_of_too_small_mmio32_window_fails() {
    let err = split_windows(
        AddressRange::new(0xc000_0000, 127 * MIB),
        config(1).mmio64,
        128,
    );
    assert!(matches!(
        err,
        Err(SegmentError::Mmio32TooSmall { ports: 128, .. })
    ));
}

#[test]
fn split_of_mmio32_window_crossing_4g_fails() {
    let err = split_windows(
        AddressRange::new(0xf000_0000, 512 * MIB),
        config(1).mmio64,
        1,
    );
    assert!(matches!(err, Err(SegmentError::Mmio32TooSmall { .. })));
}

#[test]
fn split_of_too_small_mmio64_window_fails() {
    let err = split_windows(
        config(1).mmio32,
        AddressRange::new(0x1_0000_0000, 100 * MIB),
        128,
    );
    assert!(matches!(err, Err(SegmentError::Mmio64TooSmall { .. })));
}

#[test]
fn port_count_out_of_range_is_refused() {
    for count in [0, 129] {
        let err = PciSegment::new(
            config(count),
            Arc::new(RecordingSender::default()),
            Arc::new(NullEvents),
        );
        assert!(matches!(err, Err(SegmentError::InvalidPortCount { .. })));
    }
}

#[test]
fn bus_range_too_small_for_the_ports_is_refused() {
    let cfg = SegmentConfig {
        bus_end: 7,
        ..config(8)
    };
    let err = PciSegment::new(
        cfg,
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    );
    assert!(matches!(
        err,
        Err(SegmentError::TooFewBuses { ports: 8, .. })
    ));
    let cfg = SegmentConfig {
        bus_start: 9,
        bus_end: 8,
        ..config(1)
    };
    let err = PciSegment::new(
        cfg,
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    );
    assert!(matches!(err, Err(SegmentError::TooFewBuses { .. })));
}

#[test]
fn ecam_size_covers_the_bus_range() {
    assert_eq!(segment(1).ecam_size(), 256 * MIB);
    let cfg = SegmentConfig {
        bus_end: 15,
        ..config(15)
    };
    let seg = PciSegment::new(
        cfg,
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    )
    .unwrap();
    assert_eq!(seg.ecam_size(), 16 * MIB);
}

#[test]
fn host_bridge_is_function_0_of_device_0() {
    let seg = segment(1);
    assert_eq!(seg.read_config(0, 0, 0, 0), 0x0008_1b36);
    assert_eq!(seg.read_config(0, 0, 1, 0), ABSENT);
}

#[test]
fn ports_are_placed_eight_functions_per_device() {
    let seg = segment(10);
    let addresses: Vec<(u8, u8)> = seg
        .ports()
        .iter()
        .map(|p| (p.address.device, p.address.function))
        .collect();
    assert_eq!(addresses[0], (1, 0));
    assert_eq!(addresses[7], (1, 7));
    assert_eq!(addresses[8], (2, 0));
    assert_eq!(addresses[9], (2, 1));
    assert_eq!(seg.read_config(0, 2, 1, 0), 0x000c_1b36);
    assert_eq!(seg.read_config(0, 2, 2, 0), ABSENT);
}

#[test]
fn multi_function_bit_is_set_only_on_function_0_of_shared_devices() {
    let seg = segment(9);
    let header_type = |d, f| (seg.read_config(0, d, f, 3) >> 16) as u8;
    assert_eq!(header_type(1, 0), 0x81);
    assert_eq!(header_type(1, 1), 0x01);
    assert_eq!(header_type(2, 0), 0x01);
}

#[test]
fn port_info_lists_slot_bus_and_bdf() {
    let seg = segment(3);
    let info = seg.ports()[2];
    assert_eq!(info.index, 2);
    assert_eq!(info.slot_number, 3);
    assert_eq!(info.secondary_bus, 3);
    assert_eq!(info.address.to_string(), "0000:00:01.2");
    assert_eq!(seg.port_by_slot(3).map(|(i, _)| i.index), Some(2));
    assert!(seg.port_by_slot(4).is_none());
    assert!(seg.port(2).is_some() && seg.port(3).is_none());
}

#[test]
fn ports_are_pre_programmed_with_their_windows() {
    let seg = segment(4);
    for info in seg.ports() {
        let port = seg.port(info.index).unwrap().lock().unwrap();
        assert_eq!(
            port.programmed_windows(),
            (Some(info.windows.mmio32), Some(info.windows.mmio64))
        );
    }
}

#[test]
fn absent_functions_read_all_ones() {
    let seg = segment(2);
    assert_eq!(seg.read_config(0, 31, 0, 0), ABSENT);
    assert_eq!(seg.read_config(0, 32, 0, 0), ABSENT);
    assert_eq!(seg.read_config(0, 1, 8, 0), ABSENT);
    assert_eq!(seg.read_config(1, 0, 0, 0), ABSENT);
    assert_eq!(seg.read_config(200, 0, 0, 0), ABSENT);
}

#[test]
fn buses_outside_the_segment_read_all_ones() {
    let cfg = SegmentConfig {
        bus_start: 0x10,
        bus_end: 0x1f,
        ..config(2)
    };
    let seg = PciSegment::new(
        cfg,
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    )
    .unwrap();
    assert_eq!(seg.read_config(0, 0, 0, 0), ABSENT);
    assert_eq!(seg.read_config(0x10, 0, 0, 0), 0x0008_1b36);
    assert_eq!(seg.ports()[1].secondary_bus, 0x12);
}

#[test]
fn writes_to_absent_functions_are_dropped() {
    let seg = segment(1);
    seg.write_config(0, 5, 0, 1, 0, &[0xff; 4]);
    seg.write_config(3, 0, 0, 1, 0, &[0xff; 4]);
    assert_eq!(seg.read_config(0, 5, 0, 0), ABSENT);
}

/// Inserts a device in port `index` the way a ready guest allows it.
pub(crate) fn insert(seg: &PciSegment, index: usize, id: u32) {
    let mut port = seg.port(index).unwrap().lock().unwrap();
    port.insert_device_at_boot(TestDevice::shared(id)).unwrap();
}

#[test]
fn device_behind_a_port_is_reached_on_its_secondary_bus() {
    let seg = segment(3);
    insert(&seg, 1, 0x1111_8086);
    assert_eq!(seg.read_config(2, 0, 0, 0), 0x1111_8086);
    assert_eq!(seg.read_config(3, 0, 0, 0), ABSENT);
    assert_eq!(seg.read_config(2, 0, 1, 0), ABSENT);
}

#[test]
fn routing_follows_reprogrammed_bus_numbers() {
    let seg = segment(3);
    insert(&seg, 0, 0x2222_8086);
    // The guest renumbers port 0 to bus 0x20 and port 1 to buses 1..=4.
    seg.write_config(0, 1, 0, 6, 0, &[0, 0x20, 0x20, 0]);
    seg.write_config(0, 1, 1, 6, 0, &[0, 1, 4, 0]);
    assert_eq!(seg.read_config(0x20, 0, 0, 0), 0x2222_8086);
    assert_eq!(seg.read_config(1, 0, 0, 0), ABSENT);
    insert(&seg, 1, 0x3333_8086);
    assert_eq!(seg.read_config(1, 0, 0, 0), 0x3333_8086);
    assert_eq!(seg.read_config(4, 0, 0, 0), ABSENT);
}

#[test]
fn port_with_cleared_bus_numbers_claims_nothing() {
    let seg = segment(1);
    insert(&seg, 0, 0x4444_8086);
    seg.write_config(0, 1, 0, 6, 0, &[0, 0, 0, 0]);
    assert_eq!(seg.read_config(1, 0, 0, 0), ABSENT);
}

#[test]
fn config_writes_reach_the_device_behind_a_port() {
    let seg = segment(1);
    insert(&seg, 0, 0x5555_8086);
    seg.write_config(1, 0, 0, 4, 0, &0xdead_beefu32.to_le_bytes());
    assert_eq!(seg.read_config(1, 0, 0, 4), 0xdead_beef);
}

/// A device that, when written, records whether its port's lock was free.
struct PortProbe {
    port: Arc<std::sync::OnceLock<SharedRootPort>>,
    port_was_free: Arc<Mutex<Vec<bool>>>,
}

impl PciDevice for PortProbe {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == 0 {
            return 0x6666_8086;
        }
        self.record();
        0
    }

    fn write_config_register(&mut self, _reg: usize, _offset: u64, _data: &[u8]) {
        self.record();
    }
}

impl PortProbe {
    fn record(&self) {
        let free = self.port.get().is_some_and(|p| p.try_lock().is_ok());
        self.port_was_free.lock().unwrap().push(free);
    }
}

#[test]
fn device_behind_a_port_is_called_without_the_port_lock_held() {
    let seg = segment(1);
    let port = Arc::new(std::sync::OnceLock::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _ = port.set(seg.port(0).unwrap().clone());
    let probe = Arc::new(Mutex::new(PortProbe {
        port: port.clone(),
        port_was_free: seen.clone(),
    }));
    seg.port(0)
        .unwrap()
        .lock()
        .unwrap()
        .insert_device_at_boot(probe)
        .unwrap();

    seg.write_config(1, 0, 0, 4, 0, &6u32.to_le_bytes());
    let _ = seg.read_config(1, 0, 0, 4);

    assert_eq!(*seen.lock().unwrap(), [true, true]);
}

#[test]
fn two_root_buses_split_the_bus_range_and_deal_the_ports() {
    let seg = PciSegment::new(
        SegmentConfig {
            root_buses: 2,
            ..config(5)
        },
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    )
    .unwrap();
    assert_eq!(seg.config().root_bus_range(0), (0, 0x7f));
    assert_eq!(seg.config().root_bus_range(1), (0x80, 0xff));
    let ports: Vec<(u8, u8, u8, u8)> = seg
        .ports()
        .iter()
        .map(|p| {
            (
                p.address.bus,
                p.address.device,
                p.address.function,
                p.secondary_bus,
            )
        })
        .collect();
    assert_eq!(
        ports,
        vec![
            (0, 1, 0, 1),
            (0x80, 1, 0, 0x81),
            (0, 1, 1, 2),
            (0x80, 1, 1, 0x82),
            (0, 1, 2, 3),
        ]
    );
    // The host bridge only on root bus 0; port 1 answers at 80:01.0, port 3 at 80:01.1.
    assert_ne!(seg.read_config(0, 0, 0, 0), ABSENT);
    assert_eq!(seg.read_config(0x80, 0, 0, 0), ABSENT);
    let id = seg.read_config(0, 1, 0, 0);
    assert_ne!(id, ABSENT);
    assert_eq!(seg.read_config(0x80, 1, 0, 0), id);
    assert_eq!(seg.read_config(0x80, 1, 1, 0), id);
    assert_eq!(seg.read_config(0x80, 1, 2, 0), ABSENT);
    // Port 1's primary bus register says its root bus.
    assert_eq!(seg.read_config(0x80, 1, 0, 6) & 0xff, 0x80);
    assert_eq!((seg.read_config(0x80, 1, 0, 6) >> 8) & 0xff, 0x81);
}

#[test]
fn more_root_buses_than_ports_are_refused() {
    let err = PciSegment::new(
        SegmentConfig {
            root_buses: 3,
            ..config(2)
        },
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    )
    .err();
    assert!(matches!(err, Some(SegmentError::TooFewBuses { .. })));
}

#[test]
fn io_windows_are_4k_each_in_port_order_while_the_space_lasts() {
    let w = split_io(AddressRange::new(0x1000, 0xf000), 17);
    assert_eq!(w.len(), 17);
    for (i, io) in w.iter().enumerate().take(15) {
        assert_eq!(
            *io,
            Some(AddressRange::new(0x1000 * (i as u64 + 1), 0x1000))
        );
    }
    assert_eq!(w[15], None);
    assert_eq!(w[16], None);
    // An unaligned start is rounded up; nothing past 64 KiB.
    let w = split_io(AddressRange::new(0xd00, 0x2300), 3);
    assert_eq!(
        w,
        vec![
            Some(AddressRange::new(0x1000, 0x1000)),
            Some(AddressRange::new(0x2000, 0x1000)),
            None
        ]
    );
    assert_eq!(split_io(AddressRange::new(0xf000, 0x10_0000), 2)[1], None);
    assert!(split_io(AddressRange::new(0, 0), 2)
        .iter()
        .all(Option::is_none));
}

#[test]
fn ports_are_built_with_their_io_windows() {
    let seg = segment(16);
    assert_eq!(
        seg.ports()[0].windows.io,
        Some(AddressRange::new(0x1000, 0x1000))
    );
    assert_eq!(
        seg.ports()[14].windows.io,
        Some(AddressRange::new(0xf000, 0x1000))
    );
    assert_eq!(seg.ports()[15].windows.io, None);
    // Port 0 decodes its window: I/O base 0x10, I/O limit 0x10 (0x1000..=0x1fff).
    let bridge = seg.read_config(0, 1, 0, 0x1c / 4);
    assert_eq!(bridge & 0xffff, 0x1010);
    // Port 15 has none: closed (base above limit).
    let bridge = seg.read_config(0, 2, 7, 0x1c / 4);
    assert_eq!(bridge & 0xffff, 0x00f0);
}

#[test]
fn reserved_mmio64_windows_are_size_aligned_and_in_port_order() {
    let window = AddressRange::new(0x1_4000_0000, 1024 * GIB);
    let w = reserve_mmio64(window, 3, 128 * GIB).unwrap();
    assert_eq!(
        w,
        vec![
            AddressRange::new(128 * GIB, 128 * GIB),
            AddressRange::new(256 * GIB, 128 * GIB),
            AddressRange::new(384 * GIB, 128 * GIB),
        ]
    );
}

#[test]
fn reserved_mmio64_windows_that_do_not_fit_are_refused_with_the_sizes() {
    let window = AddressRange::new(0x1_4000_0000, 512 * GIB);
    assert_eq!(
        reserve_mmio64(window, 4, 128 * GIB),
        Err(SegmentError::Mmio64PerPortTooLarge {
            base: 0x1_4000_0000,
            size: 512 * GIB,
            ports: 4,
            per_port: 128 * GIB
        })
    );
    assert_eq!(
        reserve_mmio64(window, 4, 3 * GIB),
        Err(SegmentError::Mmio64PerPortInvalid { per_port: 3 * GIB })
    );
    assert_eq!(
        reserve_mmio64(window, 4, 4096),
        Err(SegmentError::Mmio64PerPortInvalid { per_port: 4096 })
    );
}

#[test]
fn segment_with_a_per_port_mmio64_size_gives_every_port_that_window() {
    let cfg = SegmentConfig {
        mmio64_per_port: Some(64 * GIB),
        ..config(4)
    };
    let seg = PciSegment::new(
        cfg,
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    )
    .unwrap();
    for (i, port) in seg.ports().iter().enumerate() {
        assert_eq!(
            port.windows.mmio64,
            AddressRange::new(0x100_0000_0000 + i as u64 * 64 * GIB, 64 * GIB)
        );
    }
}

#[test]
fn a_cold_plugged_large_bar_gets_a_window_of_its_size_and_the_others_share_the_rest() {
    // 508 GiB from 4 GiB (a 39-bit host): the even share of 8 ports is 32 GiB.
    let window = AddressRange::new(4 * GIB, 508 * GIB);
    let w = split_mmio64_with_minimums(window, 8, &[128 * GIB, 0, 3 * GIB]).unwrap();
    assert_eq!(w[0].size, 128 * GIB);
    assert_eq!(w[2].size, 32 * GIB);
    for (i, a) in w.iter().enumerate() {
        assert_eq!(a.base % a.size, 0, "port {i} aligned");
        assert!(window.contains_range(a), "port {i} inside");
        assert!(a.size >= 32 * GIB, "port {i} keeps the even share");
        for b in &w[i + 1..] {
            assert!(
                a.last().unwrap() < b.base || b.last().unwrap() < a.base,
                "disjoint"
            );
        }
    }
}

#[test]
fn minimums_that_cannot_fit_are_refused_with_the_largest() {
    let window = AddressRange::new(4 * GIB, 508 * GIB);
    assert_eq!(
        split_mmio64_with_minimums(window, 8, &[512 * GIB]),
        Err(SegmentError::Mmio64MinimumsTooLarge {
            base: 4 * GIB,
            size: 508 * GIB,
            ports: 8,
            largest: 512 * GIB
        })
    );
}

#[test]
fn segment_sizes_ports_for_their_minimums_only_above_the_even_share() {
    let cfg = SegmentConfig {
        mmio64_minimums: vec![MIB],
        ..config(8)
    };
    let even = segment(8).ports()[0].windows.mmio64;
    let seg = PciSegment::new(
        cfg,
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    )
    .unwrap();
    assert_eq!(seg.ports()[0].windows.mmio64, even);
    let cfg = SegmentConfig {
        mmio64_minimums: vec![0, 128 * GIB],
        ..config(8)
    };
    let seg = PciSegment::new(
        cfg,
        Arc::new(RecordingSender::default()),
        Arc::new(NullEvents),
    )
    .unwrap();
    assert_eq!(seg.ports()[1].windows.mmio64.size, 128 * GIB);
}
