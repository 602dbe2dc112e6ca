//! The release the native A/B backend installs.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// An OS image to stage into the inactive slot. The agent refuses it unless both the
/// sha256 and the ed25519 signature check out.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    /// The version this image carries; nodes converge on it.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$')").message("version must be 1 to 128 letters, digits, '.', '_', '+' or '-', such as 4230.2.1"))]
    #[schemars(length(max = 128))]
    pub version: String,
    /// Where the image is downloaded from (HTTPS).
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("url must start with https://"))]
    #[schemars(length(max = 2048))]
    pub url: String,
    /// The image's SHA-256, 64 lowercase hex digits.
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("sha256 must be 64 lowercase hex digits"))]
    #[schemars(length(max = 64))]
    pub sha256: String,
    /// The base64 ed25519 signature of the image's SHA-256 digest.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9+/]{86}==$')").message("signature must be a base64 ed25519 signature (88 characters ending in ==)"))]
    #[schemars(length(max = 88))]
    pub signature: String,
}
