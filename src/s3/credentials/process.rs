//! `credential_process`: a profile names a command whose standard output is
//! `{"Version": 1, "AccessKeyId": ..., "SecretAccessKey": ..., "SessionToken": ...,
//! "Expiration": "RFC 3339"}`. The command line is split like a shell's words (quotes and
//! backslashes) but not run through a shell, as the CLI does. It runs again before the
//! expiry; without `Expiration` the keys are kept until the shared files change.

use std::process::Stdio;
use std::time::Duration;

use super::{credentials_from_json, Fetched, ProviderError};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `command_line` and reads its credentials. `origin` names the profile for messages.
pub async fn run(command_line: &str, origin: &str) -> Result<Fetched, ProviderError> {
    let failed = |what: String| {
        ProviderError::Failed(format!(
            "{origin}: credential_process {command_line:?} {what}"
        ))
    };
    let words = split_words(command_line).map_err(|e| failed(e.to_string()))?;
    let Some((program, args)) = words.split_first() else {
        return Err(failed("is empty".into()));
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("cannot be started: {e}")))?;
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| failed(format!("did not finish in {} s", TIMEOUT.as_secs())))?
        .map_err(|e| failed(format!("failed: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first: String = stderr
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        return Err(failed(format!("exited with {}: {first}", out.status)));
    }
    parse_output(&String::from_utf8_lossy(&out.stdout)).map_err(failed)
}

/// The JSON a credential process prints.
pub fn parse_output(text: &str) -> Result<Fetched, String> {
    let value: serde_json::Value = serde_json::from_str(text.trim())
        .map_err(|e| format!("printed something that is not JSON ({e})"))?;
    match value.get("Version").and_then(|v| v.as_u64()) {
        Some(1) => {}
        other => {
            return Err(format!(
                "printed Version {}; only Version 1 is defined",
                other.map_or("(none)".to_string(), |v| v.to_string())
            ))
        }
    }
    credentials_from_json(&value, "SessionToken").map_err(|e| format!("printed JSON where {e}"))
}

/// Shell-like words: spaces separate, '...' and "..." quote, backslash escapes.
pub fn split_words(line: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("has an unclosed ' quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => word.push(c),
                            None => return Err("ends with a backslash"),
                        },
                        Some(c) => word.push(c),
                        None => return Err("has an unclosed \" quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err("ends with a backslash"),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        assert_eq!(
            split_words(r#"/opt/my tool --profile "a b" 'c d' e\ f"#).unwrap(),
            ["/opt/my", "tool", "--profile", "a b", "c d", "e f"]
        );
        assert_eq!(split_words(r#""""#).unwrap(), [""]);
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn output_json() {
        let f = parse_output(
            r#"{"Version":1,"AccessKeyId":"AK","SecretAccessKey":"sk","SessionToken":"tok","Expiration":"2030-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(f.credentials.session_token(), Some("tok"));
        assert!(f.expires.is_some());
        let f = parse_output(r#"{"Version":1,"AccessKeyId":"AK","SecretAccessKey":"sk"}"#).unwrap();
        assert_eq!(f.expires, None);
        assert!(
            parse_output(r#"{"Version":2,"AccessKeyId":"AK","SecretAccessKey":"sk"}"#)
                .unwrap_err()
                .contains("Version 2")
        );
        assert!(parse_output("hello").unwrap_err().contains("not JSON"));
        let e = parse_output(r#"{"Version":1,"SecretAccessKey":"sk-secret"}"#).unwrap_err();
        assert!(!e.contains("sk-secret"), "{e}");
    }

    #[tokio::test]
    async fn runs_a_command() {
        let ok = run(
            r#"echo '{"Version":1,"AccessKeyId":"AK","SecretAccessKey":"sk"}'"#,
            "profile 'p'",
        )
        .await
        .unwrap();
        assert_eq!(ok.credentials.access_key_id(), "AK");
        let e = run("sh -c 'echo denied >&2; exit 3'", "profile 'p'")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProviderError::Failed(m) if m.contains("profile 'p'") && m.contains("denied")),
            "{e:?}"
        );
        let e = run("/nonexistent/tool", "profile 'p'").await.unwrap_err();
        assert!(e.message().contains("cannot be started"), "{e:?}");
    }
}
