//! Fuzz target: arbitrary bytes as a signed manifest (JSON), a vendor
//! `plugin.toml`, a SMART scope and a key file. Must never panic, and a
//! manifest that parses must re-serialise to one that parses identically.
#![no_main]

use clinicbox::bundle::manifest::{Manifest, ManifestSource};
use clinicbox::limits::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(m) = Manifest::parse(data, &limits) {
        let again = Manifest::parse(&m.to_json(), &limits).expect("re-serialised manifest parses");
        assert_eq!(m, again);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ManifestSource::parse(text, "fuzz");
        if let Ok(s) = text.parse::<clinicbox::scopes::Scope>() {
            assert_eq!(s.to_string().parse::<clinicbox::scopes::Scope>().ok(), Some(s));
        }
        let _ = clinicbox::keys::parse_public(text, "fuzz");
        let _ = clinicbox::bundle::trust::Namespace::parse(text);
        let _ = clinicbox::bundle::manifest::PluginName::parse(text);
    }
});
