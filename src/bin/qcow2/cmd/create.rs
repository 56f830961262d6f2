//! `qcow2 create`.

/// Arguments of `qcow2 create`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Run `qcow2 create`.
pub async fn run(_a: Args) -> anyhow::Result<u8> {
    anyhow::bail!("create is not implemented yet")
}

/// Create a qcow2 image of `size` bytes with `-o` options and an optional backing file.
pub async fn create_qcow2(
    _path: &std::path::Path,
    _size: u64,
    _options: Option<&str>,
    _backing: Option<(&str, Option<&str>)>,
) -> anyhow::Result<()> {
    anyhow::bail!("creating qcow2 images is not implemented yet")
}
