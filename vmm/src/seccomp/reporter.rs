//! The SIGSYS reporter: when a filter traps a syscall, name it, the ioctl request if it was one,
//! and the thread, on stderr, then end the process with exit code 1.
//!
//! The handler runs inside a seccomp-filtered thread, possibly with a lock held by the code it
//! interrupted, so it only does what is async-signal-safe and allowed by every filter: it formats
//! into a buffer on its stack from static tables and the thread's label (a const-initialized
//! thread-local set when the filter was installed, else the kernel's name of the thread), `write`s
//! it and `_exit`s. Nothing allocates.

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;

use vmm_sys_util::signal::register_signal_handler;

use super::names::syscall_name;

/// Longest thread label kept (Linux thread names are at most 15 bytes).
const LABEL_MAX: usize = 32;
/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;
/// Exit code after a blocked syscall: an rvmm error.
const EXIT_BLOCKED: i32 = 1;
/// Size of the message buffer; the longest message is well below it.
const MESSAGE_MAX: usize = 256;

thread_local! {
    /// This thread's name for the report, and its length.
    static LABEL: Cell<([u8; LABEL_MAX], usize)> = const { Cell::new(([0; LABEL_MAX], 0)) };
}

/// Names the calling thread in reports of syscalls it is blocked from making.
pub fn set_thread_label(label: &str) {
    let mut bytes = [0u8; LABEL_MAX];
    let len = label.len().min(LABEL_MAX);
    bytes[..len].copy_from_slice(&label.as_bytes()[..len]);
    LABEL.with(|l| l.set((bytes, len)));
}

/// Installs the SIGSYS handler (once per process; later calls return the first outcome).
pub fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(libc::SIGSYS, on_sigsys).map_err(|e| e.errno()))
        .map_err(io::Error::from_raw_os_error)
}

/// The fields of a seccomp SIGSYS's `siginfo_t` (`_sigsys` of the kernel's union), which the libc
/// crate does not expose.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// A message built without allocating; bytes past the end are dropped.
struct Message {
    bytes: [u8; MESSAGE_MAX],
    len: usize,
}

impl Message {
    fn new() -> Self {
        Self {
            bytes: [0; MESSAGE_MAX],
            len: 0,
        }
    }

    fn push(&mut self, text: &[u8]) {
        for &b in text {
            if let Some(slot) = self.bytes.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn push_decimal(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }

    fn push_hex(&mut self, value: u64) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.push(b"0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let nibble = ((value >> (shift * 4)) & 0xf) as usize;
            if nibble != 0 || started || shift == 0 {
                started = true;
                self.push(&HEX[nibble..=nibble]);
            }
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len.min(MESSAGE_MAX)]
    }
}

/// The report of a blocked `syscall` (with its ioctl `request`, when it was `ioctl`) on the thread
/// `label`.
fn report(syscall: i64, request: Option<u64>, label: &[u8]) -> Message {
    let mut m = Message::new();
    m.push(b"rvmm: seccomp blocked syscall ");
    m.push(syscall_name(syscall).unwrap_or("unknown").as_bytes());
    m.push(b" (");
    if syscall < 0 {
        m.push(b"-");
    }
    m.push_decimal(syscall.unsigned_abs());
    m.push(b")");
    if let Some(request) = request {
        m.push(b" request ");
        m.push_hex(request);
    }
    m.push(b" on thread ");
    m.push(if label.is_empty() { b"unnamed" } else { label });
    m.push(b"; run with --seccomp log to find every missing syscall\n");
    m
}

/// Writes all of `bytes` to stderr, giving up on an error.
fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: write(2) reads at most `bytes.len()` bytes from a valid slice.
        let n = unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => bytes = bytes.get(n..).unwrap_or(&[]),
            _ => return,
        }
    }
}

/// The kernel's name of the calling thread (`prctl(PR_GET_NAME)`, allowed by every filter), for
/// a thread that runs under an inherited filter before installing its own.
fn kernel_thread_name() -> ([u8; LABEL_MAX], usize) {
    // PR_GET_NAME writes at most 16 bytes, NUL included.
    let mut name = [0u8; LABEL_MAX];
    // SAFETY: the buffer is larger than the 16 bytes PR_GET_NAME writes.
    let ret = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    if ret != 0 {
        return ([0; LABEL_MAX], 0);
    }
    let len = name.iter().position(|&b| b == 0).unwrap_or(LABEL_MAX);
    (name, len)
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let (label, label_len) = match LABEL.try_with(Cell::get) {
        Ok((label, len)) if len > 0 => (label, len),
        _ => kernel_thread_name(),
    };
    let label = &label[..label_len.min(LABEL_MAX)];
    if info.is_null() {
        write_stderr(b"rvmm: SIGSYS without details\n");
        // SAFETY: _exit is async-signal-safe and ends the process.
        unsafe { libc::_exit(EXIT_BLOCKED) };
    }
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) to an SA_SIGINFO handler; the
    // SIGSYS layout is a prefix of it.
    let sys = unsafe { &*info.cast::<SigsysInfo>() };
    if sys.code != SYS_SECCOMP {
        write_stderr(b"rvmm: SIGSYS not sent by seccomp, exiting\n");
        // SAFETY: as above.
        unsafe { libc::_exit(EXIT_BLOCKED) };
    }
    let syscall = i64::from(sys.syscall);
    let request = if syscall == libc::SYS_ioctl && !context.is_null() {
        // SAFETY: the kernel passes the interrupted context, a valid ucontext_t, as the third
        // argument of an SA_SIGINFO handler; the second syscall argument is in RSI.
        let gregs = unsafe { &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        gregs
            .get(libc::REG_RSI as usize)
            .map(|&rsi| u64::from(rsi as u32))
    } else {
        None
    };
    write_stderr(report(syscall, request, label).as_bytes());
    // SAFETY: _exit is async-signal-safe and ends the process without running anything else.
    unsafe { libc::_exit(EXIT_BLOCKED) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Message) -> String {
        String::from_utf8(m.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn report_names_the_syscall_number_and_thread() {
        let m = report(libc::SYS_openat, None, b"vcpu0");
        assert_eq!(
            text(&m),
            "rvmm: seccomp blocked syscall openat (257) on thread vcpu0; \
             run with --seccomp log to find every missing syscall\n"
        );
    }

    #[test]
    fn report_of_an_ioctl_gives_the_request_in_hex() {
        let m = report(libc::SYS_ioctl, Some(0xae03), b"rvmm-vmm");
        assert!(
            text(&m).starts_with("rvmm: seccomp blocked syscall ioctl (16) request 0xae03 on"),
            "{}",
            text(&m)
        );
    }

    #[test]
    fn report_of_an_unknown_syscall_says_so() {
        let m = report(999, None, b"");
        assert!(
            text(&m).contains("syscall unknown (999) on thread unnamed;"),
            "{}",
            text(&m)
        );
    }

    #[test]
    fn overlong_messages_are_cut_not_overflowed() {
        let mut m = Message::new();
        for _ in 0..MESSAGE_MAX {
            m.push(b"xy");
        }
        assert_eq!(m.as_bytes().len(), MESSAGE_MAX);
    }

    #[test]
    fn hex_has_no_leading_zeros_and_zero_is_0x0() {
        let mut m = Message::new();
        m.push_hex(0);
        m.push(b" ");
        m.push_hex(0x4020_ae46);
        assert_eq!(text(&m), "0x0 0x4020ae46");
    }

    #[test]
    fn thread_label_is_truncated_to_its_buffer() {
        set_thread_label(&"x".repeat(LABEL_MAX + 10));
        let (_, len) = LABEL.with(Cell::get);
        assert_eq!(len, LABEL_MAX);
    }
}
