//! Helpers shared by the config-space and MMIO emulation: decoding guest accesses into dword
//! registers without trusting their size or offset.

/// Merges a guest write of `data` at byte `offset` into the 32-bit register value `old`.
///
/// Returns `None` for accesses the PCI model ignores: sizes other than 1, 2 and 4, and accesses
/// that do not fit in the dword.
pub(crate) fn merge_write(old: u32, offset: u64, data: &[u8]) -> Option<u32> {
    let offset = usize::try_from(offset).ok()?;
    if !matches!(data.len(), 1 | 2 | 4) || offset.checked_add(data.len())? > 4 {
        return None;
    }
    let mut bytes = old.to_le_bytes();
    bytes
        .get_mut(offset..offset + data.len())?
        .copy_from_slice(data);
    Some(u32::from_le_bytes(bytes))
}

/// The mask of the bits covered by a write of `len` bytes at byte `offset` of a dword
/// (zero when the access does not fit).
pub(crate) fn byte_mask(offset: u64, len: usize) -> u32 {
    if !matches!(len, 1 | 2 | 4) || offset.saturating_add(len as u64) > 4 {
        return 0;
    }
    let bits = if len == 4 {
        u32::MAX
    } else {
        (1u32 << (len * 8)) - 1
    };
    bits << (offset * 8)
}

/// Copies the little-endian bytes of `value` starting at byte `offset` into `data`, leaving
/// `data` zeroed when the access does not fit in the 64-bit value.
pub(crate) fn read_le(value: u64, offset: u64, data: &mut [u8]) {
    data.fill(0);
    let bytes = value.to_le_bytes();
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = start
        .checked_add(data.len())
        .and_then(|end| bytes.get(start..end))
    {
        data.copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_write_replaces_only_its_byte() {
        assert_eq!(merge_write(0x1122_3344, 2, &[0xaa]), Some(0x11aa_3344));
    }

    #[test]
    fn write_crossing_the_dword_is_refused() {
        assert_eq!(merge_write(0, 3, &[1, 2]), None);
        assert_eq!(merge_write(0, u64::MAX, &[1]), None);
    }

    #[test]
    fn odd_sized_write_is_refused() {
        assert_eq!(merge_write(0, 0, &[1, 2, 3]), None);
        assert_eq!(merge_write(0, 0, &[]), None);
    }

    #[test]
    fn byte_mask_covers_the_written_bytes() {
        assert_eq!(byte_mask(1, 2), 0x00ff_ff00);
        assert_eq!(byte_mask(0, 4), u32::MAX);
        assert_eq!(byte_mask(3, 2), 0);
    }

    #[test]
    fn read_past_the_value_leaves_zeroes() {
        let mut data = [0xffu8; 4];
        read_le(0x1122_3344_5566_7788, 6, &mut data);
        assert_eq!(data, [0; 4]);
        read_le(0x1122_3344_5566_7788, 4, &mut data);
        assert_eq!(data, [0x44, 0x33, 0x22, 0x11]);
    }
}
