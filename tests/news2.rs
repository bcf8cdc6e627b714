//! Scope: the example NEWS2 plugin end to end, as clinic IT would run it:
//! the signed example bundle, synthetic patients imported into the cache, a
//! grant, and `clinicbox call … news2_latest`, which reads the patient's
//! latest vital signs through `fhir_search` and answers with a
//! RiskAssessment built only from that patient's observations.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn news2_latest_scores_one_patients_latest_vitals_through_the_grant() {
    let b = news2_box(3, false);
    // Without a grant the plugin's search is denied, and the call fails.
    let denied = b.call_news2("p0002");
    assert_eq!(denied.status.code(), Some(7));
    assert!(
        stderr(&denied).contains("fhir_search refused: fhir_search is not linked"),
        "{}",
        stderr(&denied)
    );

    b.grant_news2();
    let ra: Value = serde_json::from_str(&b.ok(&as_refs(&news2_call("p0002")))).unwrap();
    assert_eq!(ra["resourceType"], "RiskAssessment");
    assert_eq!(ra["subject"]["reference"], "Patient/p0002");
    let basis = ra["basis"].as_array().unwrap();
    assert!(basis.len() >= 6, "{ra}");
    assert!(
        basis.iter().all(|r| r["reference"]
            .as_str()
            .unwrap()
            .starts_with("Observation/p0002-")),
        "{ra}"
    );
    let band = ra["prediction"][0]["outcome"]["text"].as_str().unwrap();
    assert!(
        ["low", "low-medium", "medium", "high"].contains(&band),
        "{band}"
    );

    // Install compiled the plugin into the data dir's own code cache (never
    // $HOME); the cache is safe to delete.
    let cache = b.data.join("cache/wasmtime");
    assert!(
        std::fs::read_dir(&cache)
            .map(|d| d.count() > 0)
            .unwrap_or(false),
        "no compiled code cached under {}",
        cache.display()
    );
    std::fs::remove_dir_all(b.data.join("cache")).unwrap();

    // Both calls and their data accesses are recorded.
    let calls = b.json(&["plugin", "calls", "--accesses"]);
    let calls = calls.as_array().unwrap();
    assert_eq!(calls.len(), 2);
    // A call after the cache was deleted still works (it recompiles).
    assert!(b.call_news2("p0002").status.success());
    assert_eq!(calls[0]["call"]["outcome"], "error");
    assert_eq!(calls[0]["accesses"][0]["outcome"], "denied");
    assert_eq!(calls[1]["call"]["outcome"], "ok");
    assert_eq!(calls[1]["accesses"][0]["host_fn"], "fhir_search");
    assert_eq!(calls[1]["accesses"][0]["patient"], "p0002");
}
