//! A BPF array map created with `BPF_F_MMAPABLE`, mapped read-only into
//! the agent: the kernel's tables (`CLOSE_WAITS`, `ORIGINS`) read in
//! place, a whole scan without a system call per slot.
//!
//! The kernel writes the slots while they are read: callers read fields
//! with [`MappedArray::field`] (volatile loads) and check that a slot did
//! not change under them.

use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::ptr::NonNull;

use anyhow::{anyhow, Context as _};
use aya::maps::MapData;

/// `slots` values of `T`, mapped read-only.
pub struct MappedArray<T> {
    base: NonNull<T>,
    slots: usize,
    mapped_len: usize,
    /// Holds the map's fd open as long as the mapping, when it was given
    /// (the mapping would keep the map alive by itself; this keeps the
    /// ownership plain).
    _map: Option<MapData>,
}

// SAFETY: the mapping is read-only and only read with volatile loads; the
// kernel is the only writer.
unsafe impl<T> Send for MappedArray<T> {}

impl<T: Copy> MappedArray<T> {
    /// Maps `map` (`name` in errors), an array of `slots` values of `T`
    /// created with BPF_F_MMAPABLE. `T` must be the map's value type, its
    /// size a multiple of 8 (the kernel lays array values out at their
    /// 8-byte-aligned size).
    pub fn open(map: MapData, slots: usize, name: &str) -> anyhow::Result<Self> {
        let mut mapped = Self::map(map.fd().as_fd(), slots, name)?;
        mapped._map = Some(map);
        Ok(mapped)
    }

    /// Maps the map of `fd` as [`Self::open`] does, for as long as the
    /// result lives: a table scanned now and then, whose pages should not
    /// count in the agent's resident memory between scans (the kernel maps
    /// them all at once).
    pub fn map(fd: BorrowedFd<'_>, slots: usize, name: &str) -> anyhow::Result<Self> {
        debug_assert_eq!(std::mem::size_of::<T>() % 8, 0);
        let page = crate::kernel::maps::page_size();
        let bytes = slots
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| anyhow!("a {name} table of {slots} slots is too large"))?;
        let mapped_len = bytes.div_ceil(page) * page;
        // SAFETY: a fresh shared read-only mapping of the map's fd; the
        // kernel sizes array maps' mappings to whole pages of values.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping the {name} table (needs Linux >= 5.5)"));
        }
        let base = NonNull::new(addr.cast::<T>())
            .ok_or_else(|| anyhow!("mmap of the {name} table returned null"))?;
        Ok(Self {
            base,
            slots,
            mapped_len,
            _map: None,
        })
    }

    /// Slots in the table.
    pub fn len(&self) -> usize {
        self.slots
    }

    /// The table has no slots.
    pub fn is_empty(&self) -> bool {
        self.slots == 0
    }

    /// Slot `i` (`i < len()`), for [`Self::field`] and [`Self::copy`].
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn slot(&self, i: usize) -> *const T {
        assert!(i < self.slots, "slot {i} of {}", self.slots);
        // SAFETY: `i < slots`: inside the mapping.
        unsafe { self.base.as_ptr().add(i) }
    }

    /// One field of a slot, read with a volatile load (the kernel may be
    /// writing it): `field` turns the slot's pointer into the field's, as
    /// `|s| unsafe { addr_of!((*s).sk) }`.
    pub fn field<F: Copy>(&self, i: usize, field: impl FnOnce(*const T) -> *const F) -> F {
        // SAFETY: the field of a slot inside the mapping; plain integers,
        // any bit pattern is valid.
        unsafe { std::ptr::read_volatile(field(self.slot(i))) }
    }

    /// A copy of slot `i`, read with a volatile load.
    pub fn copy(&self, i: usize) -> T {
        // SAFETY: as in `field`.
        unsafe { std::ptr::read_volatile(self.slot(i)) }
    }

    /// A consistent copy of slot `i`, or `None` for a free slot or one the
    /// kernel changed while it was copied (it is read again next time).
    /// `key` reads, from a slot's pointer, the fields that say who holds it
    /// (`None`: nobody), with volatile loads of plain fields only; the copy
    /// is kept when the slot's key before the copy, the copy's own and the
    /// slot's after it are one and the same: no other holder's fields got
    /// in. Whether the rest is complete depends on the writer's order
    /// (the CLOSE_WAITS table publishes its key last; an origin is claimed
    /// by its key first, see `probe::read_origin`).
    pub fn stable_copy<K: PartialEq + Copy>(
        &self,
        i: usize,
        key: impl Fn(*const T) -> Option<K>,
    ) -> Option<T> {
        use std::sync::atomic::{fence, Ordering};
        let before = key(self.slot(i))?;
        fence(Ordering::Acquire);
        let copy = self.copy(i);
        fence(Ordering::Acquire);
        let same = key(&copy) == Some(before) && key(self.slot(i)) == Some(before);
        same.then_some(copy)
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::unix::fs::FileExt as _;

    /// A slot the shape of the kernel's tables: a key, then a value.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Slot {
        key: u64,
        value: u64,
    }

    fn key(s: *const Slot) -> Option<u64> {
        // SAFETY: a slot of the mapping or a local copy.
        let k = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*s).key)) };
        (k != 0).then_some(k)
    }

    /// Writes slot `i` of the file behind the mapping, as the kernel would.
    fn put(file: &std::fs::File, i: u64, slot: Slot) {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&slot.key.to_ne_bytes());
        bytes[8..].copy_from_slice(&slot.value.to_ne_bytes());
        file.write_all_at(&bytes, i * 16).expect("write the slot");
    }

    #[test]
    fn a_copy_is_kept_only_when_its_holder_stayed() {
        let path = std::env::temp_dir().join(format!("tcptrace-mapped-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("a temporary file");
        // Unlinked at once: the open file is all the test needs.
        std::fs::remove_file(&path).expect("unlink it");
        file.set_len(4096).expect("size it");
        let table = MappedArray::<Slot>::map(file.as_fd(), 4, "test").expect("map it");
        // Free: nothing.
        assert_eq!(table.stable_copy(0, key), None);
        // Held: the whole slot.
        put(&file, 1, Slot { key: 7, value: 70 });
        assert_eq!(table.stable_copy(1, key), Some(Slot { key: 7, value: 70 }));
        // Another holder took the slot between the copy and the check
        // after it (the third look at the key): dropped.
        let looks = Cell::new(0);
        let changing = |s: *const Slot| {
            looks.set(looks.get() + 1);
            if looks.get() == 3 {
                put(&file, 1, Slot { key: 8, value: 80 });
            }
            key(s)
        };
        assert_eq!(table.stable_copy(1, changing), None);
        // Read again, the new holder's slot is whole.
        assert_eq!(table.stable_copy(1, key), Some(Slot { key: 8, value: 80 }));
    }
}
