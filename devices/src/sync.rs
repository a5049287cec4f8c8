//! Locks that outlive a panicked holder. rvmm's shared state (device models, buses, routing
//! tables) is consistent between statements, and a VMM that stops serving its guest because one
//! thread panicked is worse than one that goes on: every lock in rvmm is taken through these
//! traits, which take the guard of a poisoned lock as it is.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Poison-tolerant `Mutex::lock`.
pub trait MutexExt<T: ?Sized> {
    /// The guard, whether or not a holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Poison-tolerant `RwLock::read` and `RwLock::write`.
pub trait RwLockExt<T: ?Sized> {
    /// The read guard, whether or not a holder panicked.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// The write guard, whether or not a holder panicked.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    #[test]
    fn poisoned_mutex_is_still_locked() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _guard = m2.lock();
            panic!("holder panics");
        })
        .join();
        assert!(m.is_poisoned());

        *m.locked() += 1;

        assert_eq!(*m.locked(), 2);
    }

    #[test]
    fn poisoned_rwlock_is_still_read_and_written() {
        let l = Arc::new(RwLock::new(1));
        let l2 = l.clone();
        let _ = std::thread::spawn(move || {
            let _guard = l2.write();
            panic!("holder panics");
        })
        .join();
        assert!(l.is_poisoned());

        *l.write_locked() += 1;

        assert_eq!(*l.read_locked(), 2);
    }
}
