//! The environment provider: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
//! `AWS_SESSION_TOKEN`, read once when the chain is built (a running process's environment
//! does not change). `AWS_CREDENTIAL_EXPIRATION`, which some tools export with temporary keys,
//! is honoured so such keys are not used past their end.

use futures_util::future::BoxFuture;

use super::{
    parse_time, Context, Credentials, CredentialsError, Env, Fetched, Provider, ProviderError,
};

pub struct Environment {
    found: Option<Fetched>,
}

impl Environment {
    /// Reads the variables; one of the two keys without the other is an error.
    pub fn from_env(env: &dyn Env) -> Result<Self, CredentialsError> {
        let found = match (
            env.var("AWS_ACCESS_KEY_ID"),
            env.var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(id), Some(secret)) => Some(Fetched::new(
                Credentials::new(&id, &secret, env.var("AWS_SESSION_TOKEN").as_deref()),
                env.var("AWS_CREDENTIAL_EXPIRATION")
                    .as_deref()
                    .and_then(parse_time),
            )),
            (None, None) => None,
            _ => return Err(CredentialsError::IncompleteEnvironment),
        };
        Ok(Self { found })
    }

    pub fn is_set(&self) -> bool {
        self.found.is_some()
    }
}

impl Provider for Environment {
    fn name(&self) -> String {
        "environment".to_string()
    }

    fn fetch<'a>(&'a self, _ctx: &'a Context) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        let out = self.found.clone().ok_or_else(|| {
            ProviderError::Absent("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set".into())
        });
        Box::pin(async move { out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::credentials::FakeEnv;

    fn env(vars: &[(&str, &str)]) -> FakeEnv {
        FakeEnv::with(vars)
    }

    #[test]
    fn both_keys_or_none() {
        let e = Environment::from_env(&env(&[
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_SESSION_TOKEN", "t"),
        ]))
        .unwrap();
        let f = e.found.unwrap();
        assert_eq!(f.credentials.session_token(), Some("t"));
        assert!(!Environment::from_env(&env(&[])).unwrap().is_set());
        assert_eq!(
            Environment::from_env(&env(&[("AWS_ACCESS_KEY_ID", "AK")])).err(),
            Some(CredentialsError::IncompleteEnvironment)
        );
    }
}
