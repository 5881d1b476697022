//! `meridian client produce|consume`: quick manual checks, like `pulsar-client`, using
//! Meridian's own client.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use meridian_client::{Client, InitialPosition, ProducerMessage, SubscriptionType};

#[derive(Args)]
pub struct ClientArgs {
    /// Broker service URL (`pulsar://` or `pulsar+ssl://`).
    #[arg(
        long,
        default_value = "pulsar://127.0.0.1:6650",
        env = "MERIDIAN_SERVICE_URL"
    )]
    url: String,
    #[command(flatten)]
    auth: crate::tokens_cli::AuthTokenArgs,
    #[command(flatten)]
    tls: crate::tls_cli::TlsArgs,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Publish messages and print their ids.
    ///
    /// Example: meridian client produce my-topic -m hello -n 3
    Produce {
        topic: String,
        /// A message to send (repeatable).
        #[arg(long, short, required = true)]
        messages: Vec<String>,
        /// Send the messages this many times.
        #[arg(long, short = 'n', default_value_t = 1)]
        num_produce: u64,
        /// Partition key of every message.
        #[arg(long, short)]
        key: Option<String>,
        /// Properties as key=value (repeatable).
        #[arg(long, short)]
        property: Vec<String>,
    },
    /// Receive messages, print them and acknowledge them.
    ///
    /// Example: meridian client consume my-topic -s sub -p earliest -n 3
    Consume {
        topic: String,
        #[arg(long, short)]
        subscription_name: String,
        #[arg(long, short = 't', value_enum, default_value_t = Kind::Exclusive)]
        subscription_type: Kind,
        /// Where a new subscription starts.
        #[arg(long, short = 'p', value_enum, default_value_t = Position::Latest)]
        subscription_position: Position,
        /// Messages to receive (0: until interrupted).
        #[arg(long, short = 'n', default_value_t = 1)]
        num_messages: u64,
        /// Give up after this many seconds without a message (0: wait forever).
        #[arg(long, default_value_t = 0)]
        timeout_seconds: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Exclusive,
    Shared,
    Failover,
    #[value(name = "key_shared")]
    KeyShared,
}

#[derive(Clone, Copy, ValueEnum)]
enum Position {
    Latest,
    Earliest,
}

pub async fn run(arguments: ClientArgs) -> anyhow::Result<()> {
    let mut builder = Client::builder(arguments.url.as_str()).tls(arguments.tls.options());
    if let Some(token) = arguments.auth.token()? {
        builder = builder.auth_token(token);
    }
    let client = builder
        .build()
        .await
        .with_context(|| format!("connecting to {}", arguments.url))?;
    match arguments.verb {
        Verb::Produce {
            topic,
            messages,
            num_produce,
            key,
            property,
        } => {
            let producer = client
                .producer(topic.as_str())
                .create()
                .await
                .context("creating the producer")?;
            let mut properties = Vec::new();
            for pair in &property {
                let Some((name, value)) = pair.split_once('=') else {
                    bail!("property {pair:?} must be key=value");
                };
                properties.push((name.to_string(), value.to_string()));
            }
            for _ in 0..num_produce {
                for text in &messages {
                    let mut message = ProducerMessage::new(text.clone().into_bytes());
                    if let Some(key) = &key {
                        message = message.with_key(key.clone());
                    }
                    for (name, value) in &properties {
                        message = message.with_property(name.clone(), value.clone());
                    }
                    let id = producer.send_and_wait(message).await.context("sending")?;
                    println!("{id}");
                }
            }
            producer.close().await.ok();
        }
        Verb::Consume {
            topic,
            subscription_name,
            subscription_type,
            subscription_position,
            num_messages,
            timeout_seconds,
        } => {
            let consumer = client
                .consumer(topic.as_str())
                .subscription(subscription_name)
                .sub_type(match subscription_type {
                    Kind::Exclusive => SubscriptionType::Exclusive,
                    Kind::Shared => SubscriptionType::Shared,
                    Kind::Failover => SubscriptionType::Failover,
                    Kind::KeyShared => SubscriptionType::KeyShared,
                })
                .initial_position(match subscription_position {
                    Position::Latest => InitialPosition::Latest,
                    Position::Earliest => InitialPosition::Earliest,
                })
                .subscribe()
                .await
                .context("subscribing")?;
            let mut received = 0;
            while num_messages == 0 || received < num_messages {
                let message = if timeout_seconds == 0 {
                    consumer.receive().await?
                } else {
                    match tokio::time::timeout(
                        Duration::from_secs(timeout_seconds),
                        consumer.receive(),
                    )
                    .await
                    {
                        Ok(message) => message?,
                        Err(_) => {
                            bail!("no message within {timeout_seconds} s ({received} received)")
                        }
                    }
                };
                println!("----- got message -----");
                println!(
                    "id:[{}], key:[{}], properties:[{}], content:{}",
                    message.id,
                    message.key.as_deref().unwrap_or(""),
                    message
                        .properties
                        .iter()
                        .map(|(name, value)| format!("{name}={value}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    String::from_utf8_lossy(&message.payload)
                );
                consumer.ack(&message).await.context("acknowledging")?;
                received += 1;
            }
            consumer.close().await.ok();
        }
    }
    client.close().await;
    Ok(())
}
