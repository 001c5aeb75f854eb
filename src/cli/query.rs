//! `fluxctl query`: which containers are instances, and which are live as seen from this host.

use super::args::QueryArgs;
use super::{output, print, Failure};
use crate::api::client::Client;
use crate::api::views::{InstanceQuery, InstanceState, InstanceView};

pub(super) async fn query(client: &Client, json: bool, q: QueryArgs) -> Result<(), Failure> {
    if let Some(t) = &q.format {
        output::check_template(t)?;
    }
    let filter = InstanceQuery {
        service: q.service,
        host: q.host,
        rule: q.rule,
        state: q.state.as_deref().map(InstanceState::parse).transpose()?,
        selector: q.selector.to_selector()?,
    };
    let qs = filter.to_query_string();
    let views: Vec<InstanceView> = client.get(&format!("/v1/instances?{qs}")).await?;
    if json {
        print(true, &views, String::new);
    } else if q.quiet {
        for v in &views {
            println!("{}", v.instance.name);
        }
    } else if let Some(t) = &q.format {
        for v in &views {
            println!("{}", output::render_template(t, v));
        }
    } else {
        print!("{}", output::instance_table(&views));
    }
    Ok(())
}
