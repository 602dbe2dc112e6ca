//! baton's CRD on a real API server: every valid example is accepted, and every
//! invalid one is rejected at admission with the message its first line names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use crds::UpdatePolicy;
use harness::TestCluster;
use kube::{
    Api,
    api::{DynamicObject, PostParams},
};

fn fixtures(kind: &str) -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/tests")
        .join(kind);
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_accepts_valid_policies_and_rejects_invalid_ones_with_clear_messages() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.apply_crds().await.unwrap();
    let api = Api::<DynamicObject>::all_with(
        cluster.client(),
        &kube::discovery::ApiResource::erase::<UpdatePolicy>(&()),
    );

    for (path, text) in fixtures("valid") {
        let object: DynamicObject = serde_yaml_ng::from_str(&text).unwrap();
        let created = api.create(&PostParams::default(), &object).await;
        assert!(
            created.is_ok(),
            "{} was rejected: {:?}",
            path.display(),
            created.err()
        );
        // Server-side defaults are filled in from the schema.
        let stored: UpdatePolicy =
            serde_json::from_value(serde_json::to_value(created.unwrap()).unwrap()).unwrap();
        assert!(!stored.spec.drain.timeout.is_empty());
    }

    let mut checked = 0;
    for (path, text) in fixtures("invalid") {
        let expected = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: ")
            .unwrap()
            .trim()
            .to_string();
        let object: DynamicObject = serde_yaml_ng::from_str(&text).unwrap();
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => panic!("{} was accepted; expected: {expected}", path.display()),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{}: {status:?}", path.display());
                assert!(
                    status.message.contains(&expected),
                    "{}: expected {expected:?} in {:?}",
                    path.display(),
                    status.message
                );
                checked += 1;
            }
            Err(e) => panic!("{}: unexpected error {e}", path.display()),
        }
    }
    assert!(checked >= 15, "only {checked} invalid fixtures checked");
    eprintln!(
        "[crds] {} invalid fixtures rejected with their expected messages",
        checked
    );
}
