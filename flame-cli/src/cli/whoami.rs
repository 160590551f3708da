//! `flame whoami`: the user the head takes this client for.

use super::GlobalArgs;
use crate::render::{self, OutputArgs, OutputFormat};

pub async fn run(global: &GlobalArgs, out: OutputArgs) -> anyhow::Result<()> {
    let (principal, head) = super::with_client(global, |client| async move {
        let principal = client.whoami().await?;
        Ok((principal, client.head_addr().to_string()))
    })
    .await?;
    match out.output {
        OutputFormat::Json => render::print_json(&principal),
        OutputFormat::Table => {
            render::print_fields(vec![
                ("User", principal.name),
                (
                    "Admin",
                    if principal.admin { "yes" } else { "no" }.to_string(),
                ),
                ("Head", head),
            ])?;
            Ok(())
        }
    }
}
