-- rolegate check: the audits `rolegate check` runs inside the database.
-- Each query returns (problem, fix) rows; no row means no problem.

-- name: objects_not_owned
-- The classic failure: tables made by a login role that rotation will drop. (Indexes and
-- sequences that belong to a table follow the table.)
SELECT format('%s %s is owned by %s, not by the owner role',
              lower(k.kind), c.oid::regclass, pg_get_userbyid(c.relowner)),
       format('ALTER %s %s OWNER TO %I;', k.kind, c.oid::regclass, :'owner')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (SELECT CASE c.relkind
    WHEN 'r' THEN 'TABLE' WHEN 'p' THEN 'TABLE' WHEN 'v' THEN 'VIEW'
    WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
  END AS kind) k
WHERE k.kind IS NOT NULL
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_%'
  AND NOT (c.relkind = 'S' AND EXISTS (
    SELECT FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
  AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'owner')
ORDER BY 1;

-- name: functions_not_owned
SELECT format('function %s is owned by %s, not by the owner role',
              p.oid::regprocedure, pg_get_userbyid(p.proowner)),
       format('ALTER ROUTINE %s OWNER TO %I;', p.oid::regprocedure, :'owner')
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_%'
  AND NOT EXISTS (SELECT FROM pg_depend d
                  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
  AND p.proowner <> (SELECT oid FROM pg_roles WHERE rolname = :'owner')
ORDER BY 1;

-- name: schema_not_owned
SELECT format('schema public is owned by %s, not by the owner role', pg_get_userbyid(nspowner)),
       format('ALTER SCHEMA public OWNER TO %I;', :'owner')
FROM pg_namespace
WHERE nspname = 'public' AND nspowner <> (SELECT oid FROM pg_roles WHERE rolname = :'owner');

-- name: public_can_create
SELECT 'PUBLIC may still CREATE in schema public',
       'REVOKE CREATE ON SCHEMA public FROM PUBLIC;'
WHERE has_schema_privilege('public', 'public', 'CREATE');

-- name: database_not_owned
SELECT format('database %s is owned by %s, not by the owner role', datname, pg_get_userbyid(datdba)),
       format('ALTER DATABASE %I OWNER TO %I;', datname, :'owner')
FROM pg_database
WHERE datname = current_database()
  AND datdba <> (SELECT oid FROM pg_roles WHERE rolname = :'owner');

-- name: owner_can_login
SELECT 'the owner role can log in', format('ALTER ROLE %I NOLOGIN;', :'owner')
FROM pg_roles WHERE rolname = :'owner' AND rolcanlogin;

-- name: owner_missing
SELECT 'the owner role does not exist', format('CREATE ROLE %I NOLOGIN;', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner');

-- name: logins_not_members
-- Every login role (the configured one and those with the rotation prefix) must be
-- granted the owner role, or its sessions cannot SET ROLE.
SELECT format('login role %s is not a member of the owner role', r.rolname),
       format('GRANT %I TO %I;', :'owner', r.rolname)
FROM pg_roles r
WHERE (r.rolname = :'login' OR starts_with(r.rolname, :'login_prefix'))
  AND EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner')
  AND NOT pg_has_role(r.rolname, :'owner', 'MEMBER');

-- name: stale_logins
-- Login roles with the rotation prefix that are not the current login and have no
-- session: left behind by an interrupted rotation.
SELECT format('stale login role %s (rotation prefix, not the current login, no sessions)', r.rolname),
       format('REASSIGN OWNED BY %I TO %I; DROP OWNED BY %I; DROP ROLE %I;',
              r.rolname, :'owner', r.rolname, r.rolname)
FROM pg_roles r
WHERE starts_with(r.rolname, :'login_prefix') AND r.rolname <> :'login'
  AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.usename = r.rolname);
