//! Ctrl-C and SIGTERM as a request to stop, not a kill: fimbench changes the kernel's audit
//! settings and rules, and only a process that unwinds runs the guards that put them back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, bail};

static REQUESTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Makes SIGINT and SIGTERM set the flag [`check`] reads. The workloads and monitors are
/// children in the same process group, so a Ctrl-C at the terminal still ends them; the step
/// that was waiting on them then fails, and the guards restore the machine as the error
/// unwinds.
pub fn install() -> Result<()> {
    let flag = REQUESTED.get_or_init(Arc::default);
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(flag))
            .with_context(|| format!("cannot handle signal {signal}"))?;
    }
    Ok(())
}

/// An error once a stop was asked for; called between steps, so a SIGTERM sent to fimbench
/// alone ends the run at the next one.
pub fn check() -> Result<()> {
    if REQUESTED.get().is_some_and(|f| f.load(Ordering::SeqCst)) {
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
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
        let err = check().unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
    }
}
