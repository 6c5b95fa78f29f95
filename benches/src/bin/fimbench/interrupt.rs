//! Ctrl-C and SIGTERM as a request to stop, not a kill: fimbench changes the kernel's audit
//! settings and rules, and only a process that unwinds runs the guards that put them back.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set the flag [`check`] reads. The workloads and monitors are
/// children in the same process group, so a Ctrl-C at the terminal still ends them; the step
/// that was waiting on them then fails, and the guards restore the machine as the error
/// unwinds.
pub fn install() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let previous = unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            bail!("cannot handle signal {signal}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An error once a stop was asked for; called between steps, so a SIGTERM sent to fimbench
/// alone ends the run at the next one.
pub fn check() -> Result<()> {
    if REQUESTED.load(Ordering::SeqCst) {
        bail!("interrupted: stopping, and putting back what fimbench changed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_a_request_the_next_check_reports() {
        install().unwrap();
        check().unwrap();
        // SAFETY: raise(3) delivers to this thread; the handler above only sets the flag.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        let err = check().unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
    }
}
