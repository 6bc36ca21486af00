//! `rolegate setup` and `rolegate check`: the bundled provisioning SQL, rendered with the
//! names from the config and run against a live cluster.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use rand::distributions::Alphanumeric;
use rand::Rng;
use tokio_postgres::Client;

use crate::config::{Allowance, ClientClass, Config};
use crate::scram::make_verifier;
use crate::sql::{quote_ident, quote_literal};

const SETUP_SQL: &str = include_str!("sql/setup.sql");
const CHECK_SQL: &str = include_str!("sql/check.sql");

/// The role and database names setup works with.
#[derive(Debug, Clone)]
pub struct Names {
    pub owner: String,
    pub database: String,
    pub login: String,
    pub login_prefix: String,
    pub rotator: String,
    pub app_role: Option<String>,
}

impl Names {
    pub fn from_config(config: &Config) -> anyhow::Result<Names> {
        let backend = &config.backend;
        // Without a configured login (managed rotation) setup's first login carries the
        // rotation prefix, so that the rotator counts it as its own and sweeps it later.
        let login = backend
            .login_user
            .clone()
            .unwrap_or_else(|| format!("{}0001", config.own_login_prefix()));
        Ok(Names {
            owner: backend.owner_role.clone(),
            database: backend.database.clone(),
            login,
            login_prefix: config
                .rotation
                .login_prefix
                .clone()
                .unwrap_or_else(|| format!("{}_login_", backend.database)),
            rotator: backend
                .rotator_role
                .clone()
                .unwrap_or_else(|| format!("{}_rotator", backend.database)),
            app_role: backend.app_role.clone(),
        })
    }
}

/// A value for a placeholder: secrets are redacted when the SQL is printed.
#[derive(Clone)]
enum Value {
    Plain(String),
    Secret(String),
}

/// The named sections of a bundled SQL file (`-- name: x` up to the next one).
fn sections(file: &'static str) -> BTreeMap<&'static str, &'static str> {
    let mut out = BTreeMap::new();
    let mut parts = file.split("-- name: ");
    parts.next();
    for part in parts {
        let (name, body) = part.split_once('\n').unwrap_or((part, ""));
        out.insert(name.trim(), body.trim());
    }
    out
}

/// Replaces `:"name"` with a quoted identifier and `:'name'` with a quoted literal.
/// Returns the SQL to run and the SQL to show (secrets redacted).
fn render(template: &str, vars: &BTreeMap<&str, Value>) -> anyhow::Result<(String, String)> {
    let mut run = String::with_capacity(template.len());
    let mut shown = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find([':']) {
        let (before, tail) = rest.split_at(at);
        run.push_str(before);
        shown.push_str(before);
        let quote = tail.chars().nth(1);
        let placeholder = match quote {
            Some(q @ ('"' | '\'')) => tail[2..].find(q).map(|end| (q, &tail[2..2 + end])),
            _ => None,
        };
        match placeholder {
            Some((q, name)) if name.chars().all(|c| c.is_ascii_lowercase() || c == '_') => {
                let value = vars
                    .get(name)
                    .with_context(|| format!("the SQL needs a value for {name}"))?;
                let (text, secret) = match value {
                    Value::Plain(v) => (v, false),
                    Value::Secret(v) => (v, true),
                };
                let quoted = if q == '"' {
                    quote_ident(text)
                } else {
                    quote_literal(text)
                };
                run.push_str(&quoted);
                shown.push_str(if secret { "'<redacted>'" } else { &quoted });
                rest = &tail[2 + name.len() + 1..];
            }
            _ => {
                run.push(':');
                shown.push(':');
                rest = &tail[1..];
            }
        }
    }
    run.push_str(rest);
    shown.push_str(rest);
    Ok((run, shown))
}

/// One step of a setup plan.
pub struct Step {
    /// Run in the target database rather than in the admin URL's database.
    pub in_database: bool,
    pub sql: String,
    pub shown: String,
}

pub struct SetupOptions<'a> {
    pub admin_url: &'a str,
    pub print_sql: bool,
    /// Rotator password from the admin; generated (and printed once) if absent.
    pub rotator_password: Option<String>,
}

pub fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// An administrative connection (tokio-postgres; setup, check and the rotator use it),
/// with its connection task running.
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "admin connection ended");
        }
    });
    Ok(client)
}

/// The admin URL pointed at another database.
fn url_for_database(admin_url: &str, database: &str) -> anyhow::Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config = admin_url.parse().context("parsing the admin URL")?;
    config.dbname(database);
    Ok(config)
}

async fn role_exists(client: &Client, name: &str) -> anyhow::Result<bool> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await?
        .is_some())
}

/// Where the login password lives, per the config.
enum PasswordHome<'a> {
    File(&'a Path),
    Env(&'a str),
}

/// One step of the plan: a section of setup.sql, where it runs, and the values only it
/// needs (a class role, a login).
struct PlanStep {
    name: &'static str,
    in_database: bool,
    vars: Vec<(&'static str, Value)>,
}

fn step(name: &'static str, in_database: bool) -> PlanStep {
    PlanStep {
        name,
        in_database,
        vars: Vec::new(),
    }
}

fn step_with(name: &'static str, in_database: bool, vars: Vec<(&'static str, Value)>) -> PlanStep {
    PlanStep {
        name,
        in_database,
        vars,
    }
}

/// A static class login as setup finds it.
struct StaticClassLogin {
    class_role: String,
    login: String,
    exists: bool,
    /// A new password's SCRAM verifier, when setup sets one.
    verifier: Option<String>,
    /// Other class roles it is a member of (revoked: one class role per login).
    revoke: Vec<String>,
}

/// The login-per-class part of the layout: what exists, and what setup will do about it.
#[derive(Default)]
struct ClassLayout {
    enabled: bool,
    grantor: String,
    grantor_exists: bool,
    /// (class, class role, exists, gets TEMPORARY)
    roles: Vec<(ClientClass, String, bool, bool)>,
    /// Static mode: each class's login.
    logins: Vec<StaticClassLogin>,
    /// Passwords setup generated, for their files once everything ran.
    new_password_files: Vec<(String, std::path::PathBuf, String)>,
}

impl ClassLayout {
    async fn survey(config: &Config, admin: &Client) -> anyhow::Result<ClassLayout> {
        let Some(class_logins) = &config.backend.logins else {
            return Ok(ClassLayout::default());
        };
        let owner = config.backend.owner_role.clone();
        let grantor = crate::credentials::rotate::connect_grantor(config);
        let mut layout = ClassLayout {
            enabled: true,
            grantor_exists: role_exists(admin, &grantor).await?,
            grantor,
            ..ClassLayout::default()
        };
        for class in [ClientClass::App, ClientClass::Readonly] {
            let role = config.class_role(class);
            // TEMPORARY only for a class whose clients may make temporary tables.
            let temporary = config
                .clients
                .iter()
                .any(|c| c.class == class && c.allow.contains(&Allowance::TempTables));
            let exists = role_exists(admin, &role).await?;
            layout.roles.push((class, role, exists, temporary));
        }
        if config.rotation.mode != crate::config::RotationMode::Static {
            return Ok(layout);
        }
        let class_roles = [
            owner.clone(),
            config.class_role(ClientClass::App),
            config.class_role(ClientClass::Readonly),
        ];
        for class in crate::config::CLASSES {
            let login_config = class_logins.get(class);
            let Some(login) = login_config.user.clone() else {
                continue;
            };
            let role = config.class_role(class);
            let exists = role_exists(admin, &login).await?;
            let password = match (&login_config.password_file, &login_config.password_env) {
                (Some(path), _) if exists && path.exists() => None,
                (Some(path), _) => {
                    let p = random_password();
                    layout
                        .new_password_files
                        .push((login.clone(), path.clone(), p.clone()));
                    Some(p)
                }
                (None, Some(var)) => Some(std::env::var(var).with_context(|| {
                    format!("{var} must hold the {class} login's password for setup")
                })?),
                (None, None) => None,
            };
            let mut revoke = Vec::new();
            if exists {
                for other in class_roles.iter().filter(|r| **r != role) {
                    let member: bool = admin
                        .query_one(
                            "SELECT EXISTS (SELECT FROM pg_auth_members m
                               JOIN pg_roles r ON r.oid = m.roleid
                               JOIN pg_roles l ON l.oid = m.member
                             WHERE r.rolname = $1 AND l.rolname = $2)",
                            &[other, &login],
                        )
                        .await?
                        .get(0);
                    if member {
                        revoke.push(other.clone());
                    }
                }
            }
            layout.logins.push(StaticClassLogin {
                class_role: role,
                login,
                exists,
                verifier: password.map(|p| make_verifier(&p)),
                revoke,
            });
        }
        Ok(layout)
    }

    fn plan(&self, plan: &mut Vec<PlanStep>, version: i32) {
        if !self.enabled {
            return;
        }
        let plain = |v: &String| Value::Plain(v.clone());
        for (_, role, exists, _) in &self.roles {
            let vars = vec![("class_role", plain(role))];
            plan.push(step_with(
                if *exists {
                    "class_role_attributes"
                } else {
                    "create_class_role"
                },
                false,
                vars.clone(),
            ));
            plan.push(step_with(
                if version >= 160_000 {
                    "grant_rotator_admin_class_pg16"
                } else {
                    "grant_rotator_admin_class"
                },
                false,
                vars,
            ));
        }
        if !self.grantor_exists {
            plan.push(step_with(
                "create_connect_grantor",
                false,
                vec![("grantor", plain(&self.grantor))],
            ));
        }
        plan.push(step_with(
            "connect_grantor",
            false,
            vec![("grantor", plain(&self.grantor))],
        ));
        for StaticClassLogin {
            class_role: role,
            login,
            exists,
            verifier,
            revoke,
        } in &self.logins
        {
            let mut vars = vec![("class_role", plain(role)), ("login", plain(login))];
            if let Some(v) = verifier {
                vars.push(("login_password", Value::Secret(v.clone())));
            }
            if !exists {
                plan.push(step_with("create_class_login", false, vars.clone()));
            } else if verifier.is_some() {
                plan.push(step_with("set_class_login_password", false, vars.clone()));
            }
            for other in revoke {
                let mut vars = vars.clone();
                vars.push(("other_role", plain(other)));
                plan.push(step_with("revoke_membership", false, vars));
            }
            plan.push(step_with(
                if version >= 160_000 {
                    "class_login_membership_pg16"
                } else {
                    "class_login_membership"
                },
                false,
                vars,
            ));
        }
        for (class, role, _, temporary) in &self.roles {
            let vars = vec![("class_role", plain(role))];
            plan.push(step_with(
                if *class == ClientClass::App {
                    "app_class_privileges"
                } else {
                    "readonly_class_privileges"
                },
                true,
                vars.clone(),
            ));
            if *temporary {
                plan.push(step_with("class_temporary", true, vars));
            }
        }
    }
}

/// Plans and (unless printing) applies the layout. Safe to run again.
pub async fn setup(config: &Config, options: SetupOptions<'_>) -> anyhow::Result<()> {
    let names = Names::from_config(config)?;
    let admin_url = options.admin_url.parse().context("parsing the admin URL")?;
    let admin = connect(&admin_url)
        .await
        .context("connecting with the admin URL")?;
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let home = match (
        &config.backend.login_password_file,
        &config.backend.login_password_env,
    ) {
        (Some(path), _) => Some(PasswordHome::File(path)),
        (None, Some(var)) => Some(PasswordHome::Env(var)),
        // Managed rotation makes its own login roles, file rotation reads them from files,
        // and each class names its own with [backend.logins]: setup needs no shared one.
        (None, None)
            if config.rotation.mode != crate::config::RotationMode::Static
                || config.class_logins() =>
        {
            None
        }
        (None, None) => bail!("[backend] needs login_password_file (or login_password_env)"),
    };
    let class_layout = ClassLayout::survey(config, &admin).await?;

    let sections = sections(SETUP_SQL);
    let owner_exists = role_exists(&admin, &names.owner).await?;
    let database_owner: Option<String> = admin
        .query_opt(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
            &[&names.database],
        )
        .await?
        .map(|row| row.get(0));
    let rotator_exists = role_exists(&admin, &names.rotator).await?;
    let login_exists = role_exists(&admin, &names.login).await?;
    let app_role_exists = match &names.app_role {
        Some(role) => role_exists(&admin, role).await?,
        None => true,
    };

    // The login password: kept if the role and its password file both exist already.
    let mut new_login_password = None;
    let login_password = match &home {
        None => None,
        Some(PasswordHome::File(path)) if login_exists && path.exists() => None,
        Some(PasswordHome::File(_)) => {
            let p = random_password();
            new_login_password = Some(p.clone());
            Some(p)
        }
        Some(PasswordHome::Env(var)) => Some(
            std::env::var(var)
                .with_context(|| format!("{var} must hold the login password for setup"))?,
        ),
    };
    let mut generated_rotator_password = None;
    let rotator_password = match (&options.rotator_password, rotator_exists) {
        (_, true) => None,
        (Some(p), false) => Some(p.clone()),
        (None, false) => {
            let p = random_password();
            generated_rotator_password = Some(p.clone());
            Some(p)
        }
    };

    let mut vars: BTreeMap<&str, Value> = BTreeMap::new();
    vars.insert("owner", Value::Plain(names.owner.clone()));
    vars.insert("database", Value::Plain(names.database.clone()));
    vars.insert("rotator", Value::Plain(names.rotator.clone()));
    vars.insert("login", Value::Plain(names.login.clone()));
    if let Some(role) = &names.app_role {
        vars.insert("app_role", Value::Plain(role.clone()));
    }
    if let Some(p) = &rotator_password {
        vars.insert("rotator_password", Value::Secret(make_verifier(p)));
    }
    if let Some(p) = &login_password {
        vars.insert("login_password", Value::Secret(make_verifier(p)));
    }

    let mut plan: Vec<PlanStep> = Vec::new();
    plan.push(step(
        if owner_exists {
            "owner_nologin"
        } else {
            "create_owner"
        },
        false,
    ));
    match &database_owner {
        None => plan.push(step("create_database", false)),
        Some(owner) if *owner != names.owner => plan.push(step("reown_database", false)),
        Some(_) => {}
    }
    plan.push(step("database_privileges", false));
    plan.push(step(
        if rotator_exists {
            "rotator_attributes"
        } else {
            "create_rotator"
        },
        false,
    ));
    plan.push(step(
        if version >= 160_000 {
            "grant_rotator_admin_pg16"
        } else {
            "grant_rotator_admin"
        },
        false,
    ));
    let class_logins = config.class_logins();
    if home.is_some() && !class_logins {
        if !login_exists {
            plan.push(step("create_login", false));
        } else if login_password.is_some() {
            plan.push(step("set_login_password", false));
        }
        plan.push(step("login_membership", false));
    }
    let grant_app_role_to_login = home.is_some();
    plan.push(step("schema_layout", true));
    if class_logins {
        class_layout.plan(&mut plan, version);
    } else if names.app_role.is_some() {
        if !app_role_exists {
            plan.push(step("create_app_role", false));
        }
        plan.push(step("app_role_privileges", true));
        if grant_app_role_to_login {
            plan.push(step("app_role_login", false));
        }
    }

    let mut steps = Vec::new();
    for PlanStep {
        name,
        in_database,
        vars: step_vars,
    } in plan
    {
        let template = sections
            .get(name)
            .with_context(|| format!("setup.sql has no section {name}"))?;
        let mut vars = vars.clone();
        vars.extend(step_vars);
        let (sql, shown) = render(template, &vars)?;
        steps.push(Step {
            in_database,
            sql,
            shown,
        });
    }

    if options.print_sql {
        let mut current_db = false;
        for step in &steps {
            if step.in_database != current_db {
                current_db = step.in_database;
                if current_db {
                    println!("\\connect {}", quote_ident(&names.database));
                }
            }
            println!("{}\n", step.shown);
        }
        return Ok(());
    }

    let in_db = url_for_database(options.admin_url, &names.database)?;
    let mut db_client = None;
    for step in &steps {
        let client = if step.in_database {
            if db_client.is_none() {
                let client = connect(&in_db)
                    .await
                    .context("connecting to the database")?;
                db_client = Some(client);
            }
            db_client.as_ref().context("database connection")?
        } else {
            &admin
        };
        client
            .batch_execute(&step.sql)
            .await
            .with_context(|| format!("setup failed running:\n{}", step.shown))?;
    }
    if let (Some(PasswordHome::File(path)), Some(password)) = (home, &new_login_password) {
        write_secret_file(path, password)?;
        println!(
            "login password for {} written to {}",
            names.login,
            path.display()
        );
    }
    for (login, path, password) in &class_layout.new_password_files {
        write_secret_file(path, password)?;
        println!("login password for {login} written to {}", path.display());
    }
    if let Some(password) = generated_rotator_password {
        println!(
            "rotator role {} created; its password (shown only this once): {password}",
            names.rotator
        );
    }
    if config.class_logins() {
        println!(
            "setup complete: owner {}, database {}, class roles {} (app) and {} (readonly), \
             a login per class",
            names.owner,
            names.database,
            config.class_role(ClientClass::App),
            config.class_role(ClientClass::Readonly)
        );
    } else {
        println!(
            "setup complete: owner {}, database {}, login {}",
            names.owner, names.database, names.login
        );
    }
    Ok(())
}

fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}

/// One problem `check` found, with the SQL that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub problem: String,
    pub fix: String,
}

/// Audits a live database against the layout.
pub async fn check(config: &Config, admin_url: &str) -> anyhow::Result<Vec<Problem>> {
    let names = Names::from_config(config)?;
    let client = connect(&url_for_database(admin_url, &names.database)?)
        .await
        .with_context(|| format!("connecting to database {}", names.database))?;
    // With no schema on the search path, regclass and regprocedure print qualified names,
    // so every printed fix names exactly one object.
    client.batch_execute("SET search_path = pg_catalog").await?;
    let mut vars: BTreeMap<&str, Value> = BTreeMap::new();
    vars.insert("owner", Value::Plain(names.owner.clone()));
    let class_logins = config.class_logins();
    // With a login per class, every login of the one-login layout is left over.
    let shared_login = if class_logins {
        String::new()
    } else {
        names.login.clone()
    };
    vars.insert("login", Value::Plain(shared_login));
    vars.insert("login_prefix", Value::Plain(names.login_prefix.clone()));
    vars.insert("rotator", Value::Plain(names.rotator.clone()));
    for (class, role_var, login_var, prefix_var, temp_var) in [
        (
            ClientClass::App,
            "app_role",
            "app_login",
            "app_prefix",
            "app_temp",
        ),
        (
            ClientClass::Readonly,
            "readonly_role",
            "readonly_login",
            "readonly_prefix",
            "readonly_temp",
        ),
        (
            ClientClass::Migrator,
            "owner",
            "migrator_login",
            "migrator_prefix",
            "migrator_temp",
        ),
    ] {
        if class != ClientClass::Migrator {
            vars.insert(role_var, Value::Plain(config.class_role(class)));
        }
        let login = config.backend.logins.as_ref().map(|l| l.get(class));
        let static_login = match config.rotation.mode {
            crate::config::RotationMode::Static => login.and_then(|l| l.user.clone()),
            _ => None,
        };
        let prefix = match config.rotation.mode {
            crate::config::RotationMode::Managed => config.class_login_prefix(class),
            _ => String::new(),
        };
        vars.insert(login_var, Value::Plain(static_login.unwrap_or_default()));
        vars.insert(prefix_var, Value::Plain(prefix));
        let temporary = config
            .clients
            .iter()
            .any(|c| c.class == class && c.allow.contains(&Allowance::TempTables));
        vars.insert(temp_var, Value::Plain(temporary.to_string()));
    }
    let mut problems = Vec::new();
    for (name, template) in sections(CHECK_SQL) {
        if name.starts_with("class_") != class_logins {
            // The one-login layout's own audits stay as they were; the class audits need
            // a login per class.
            if name.starts_with("class_") || name == "logins_not_members" {
                continue;
            }
        }
        let (sql, _) = render(template, &vars)?;
        let rows = client
            .query(sql.trim_end_matches(';'), &[])
            .await
            .with_context(|| format!("check {name} failed"))?;
        problems.extend(rows.iter().map(|row| Problem {
            problem: row.get(0),
            fix: row.get(1),
        }));
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_quoted_and_secrets_redacted() {
        let mut vars = BTreeMap::new();
        vars.insert("owner", Value::Plain("a\"b".to_owned()));
        vars.insert(
            "login_password",
            Value::Secret("SCRAM-SHA-256$x".to_owned()),
        );
        let (run, shown) = render(
            "CREATE ROLE :\"owner\" PASSWORD :'login_password'; SELECT 1::int, ':x'",
            &vars,
        )
        .unwrap();
        assert_eq!(
            run,
            "CREATE ROLE \"a\"\"b\" PASSWORD E'SCRAM-SHA-256$x'; SELECT 1::int, ':x'"
        );
        assert!(shown.contains("'<redacted>'") && !shown.contains("SCRAM"));
    }

    #[test]
    fn every_section_renders() {
        let mut vars = BTreeMap::new();
        for name in [
            "owner",
            "database",
            "rotator",
            "login",
            "app_role",
            "rotator_password",
            "login_password",
            "login_prefix",
            "class_role",
            "grantor",
            "other_role",
            "readonly_role",
            "app_login",
            "readonly_login",
            "migrator_login",
            "app_prefix",
            "readonly_prefix",
            "migrator_prefix",
        ] {
            vars.insert(name, Value::Plain("drop table x".to_owned()));
        }
        vars.insert("app_temp", Value::Plain("true".to_owned()));
        vars.insert("readonly_temp", Value::Plain("false".to_owned()));
        for file in [SETUP_SQL, CHECK_SQL] {
            let sections = sections(file);
            assert!(sections.len() > 5);
            for (name, template) in sections {
                let (sql, _) = render(template, &vars).unwrap();
                assert!(!sql.contains(":\"") && !sql.contains(":'"), "{name}: {sql}");
                assert!(
                    matches!(
                        crate::policy::classify(&sql, true),
                        crate::policy::Classification::Statements(_)
                    ),
                    "{name} does not parse: {sql}"
                );
            }
        }
    }
}
