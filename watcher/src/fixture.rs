//! A real baseline of a small temporary tree, its journal and the [`State`] over them, for
//! the unit tests of what works on the state (no kernel needed).

use std::path::PathBuf;

use kubefim_baseline::baseline::{TrustedBaseline, create};
use kubefim_baseline::journal::Journal;
use kubefim_baseline::policy::Policy;
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::scan::ScanProgress;
use kubefim_baseline::sign::{PublicKey, SigningKey, generate};

use crate::state::State;

/// A tree with `files` (relative path, content), baselined with one `diff: true` rule.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(files: &[(&str, &str)]) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).expect("tree");
        for (rel, content) in files {
            let path = tree.join(rel);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("parents");
            std::fs::write(path, content).expect("write a fixture file");
        }
        let fx = Fixture { dir };
        let (key, _) = generate(&fx.dir.path().join("keys")).expect("keys");
        let key = SigningKey::load(&key).expect("key");
        create(&fx.policy(), &HostRoot::identity(), &fx.db(), &key, &ScanProgress::default()).expect("baseline");
        fx
    }

    pub fn tree(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    pub fn policy(&self) -> Policy {
        let yaml = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n    - path: {}\n      diff: true\n",
            self.tree().display()
        );
        Policy::from_yaml(&yaml, "test").expect("policy")
    }

    /// The state over the trusted baseline and the journal (made or reopened).
    pub fn state(&self) -> State {
        let public = PublicKey::load(&self.dir.path().join("keys/kubefim.pub")).expect("public key");
        let baseline = TrustedBaseline::open(&self.db(), &public).expect("trusted");
        let id = format!("{}", baseline.manifest.created_unix_ns);
        let journal = Journal::open(&self.dir.path().join("journal"), &id).expect("journal");
        State::load(baseline, journal).expect("state")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tree().join(rel)
    }
}
