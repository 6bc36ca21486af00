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

-- ---------------------------------------------------------------------------------------
-- A login per class ([backend.logins]); these run only for such a config. The class roles:
-- app (:'app_role'), readonly (:'readonly_role'), migrator (the owner).

-- name: class_role_missing
SELECT format('the %s class role %s does not exist', c.class, c.role),
       format('CREATE ROLE %I NOLOGIN; -- then run rolegate setup', c.role)
FROM (VALUES ('app', :'app_role'), ('readonly', :'readonly_role')) c(class, role)
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = c.role);

-- name: class_login_inherits
-- A login that inherits keeps its class role's privileges after a role reset (PostgreSQL
-- 16+ records INHERIT per membership, older versions per role).
SELECT format('login role %s inherits the privileges of %s: a session that resets its role keeps them',
              l.rolname, cr.rolname),
       format('ALTER ROLE %I NOINHERIT;', l.rolname)
         || CASE WHEN current_setting('server_version_num')::int >= 160000
                 THEN format(' GRANT %I TO %I WITH INHERIT FALSE;', cr.rolname, l.rolname)
                 ELSE '' END
FROM pg_auth_members m
JOIN pg_roles cr ON cr.oid = m.roleid
JOIN pg_roles l ON l.oid = m.member
WHERE cr.rolname IN (:'owner', :'app_role', :'readonly_role')
  AND l.rolcanlogin AND l.rolname <> :'rotator'
  AND coalesce((to_jsonb(m) ->> 'inherit_option')::bool, l.rolinherit)
ORDER BY 1;

-- name: class_login_in_two_roles
-- A login is a member of exactly one class role: its own (known from the config's login
-- names and prefixes; otherwise the least privileged one is kept).
WITH known(login, prefix, role) AS (
  VALUES (:'app_login', :'app_prefix', :'app_role'),
         (:'readonly_login', :'readonly_prefix', :'readonly_role'),
         (:'migrator_login', :'migrator_prefix', :'owner')),
memberships AS (
  SELECT l.rolname::text AS login, cr.rolname::text AS role,
         CASE cr.rolname WHEN :'readonly_role' THEN 0 WHEN :'app_role' THEN 1 ELSE 2 END AS power
  FROM pg_auth_members m
  JOIN pg_roles cr ON cr.oid = m.roleid
  JOIN pg_roles l ON l.oid = m.member
  WHERE cr.rolname IN (:'owner', :'app_role', :'readonly_role')
    AND l.rolcanlogin AND l.rolname <> :'rotator'),
kept AS (
  SELECT DISTINCT ON (ms.login) ms.login,
         coalesce(k.role, (SELECT m2.role FROM memberships m2 WHERE m2.login = ms.login
                           ORDER BY m2.power LIMIT 1)) AS role
  FROM memberships ms
  LEFT JOIN known k ON ms.login = k.login OR (k.prefix <> '' AND starts_with(ms.login, k.prefix))
  ORDER BY ms.login, length(k.prefix) DESC)
SELECT format('login role %s is a member of %s class roles (%s): its sessions can switch between them',
              m.login, count(*), string_agg(m.role, ', ' ORDER BY m.role)),
       string_agg(format('REVOKE %I FROM %I;', m.role, m.login), ' ' ORDER BY m.role)
         FILTER (WHERE m.role <> kept.role)
FROM memberships m JOIN kept ON kept.login = m.login
GROUP BY m.login
HAVING count(*) > 1
ORDER BY 1;

-- name: class_login_not_member
WITH known(class, login, prefix, role) AS (
  VALUES ('app', :'app_login', :'app_prefix', :'app_role'),
         ('readonly', :'readonly_login', :'readonly_prefix', :'readonly_role'),
         ('migrator', :'migrator_login', :'migrator_prefix', :'owner'))
SELECT format('%s login role %s is not a member of its class role %s', k.class, l.rolname, k.role),
       format('GRANT %I TO %I;', k.role, l.rolname)
FROM known k
JOIN pg_roles l ON l.rolname = k.login OR (k.prefix <> '' AND starts_with(l.rolname, k.prefix))
JOIN pg_roles cr ON cr.rolname = k.role
WHERE NOT EXISTS (SELECT FROM pg_auth_members m WHERE m.roleid = cr.oid AND m.member = l.oid)
UNION ALL
SELECT format('%s login role %s has no CONNECT of its own on the database', k.class, l.rolname),
       format('GRANT CONNECT ON DATABASE %I TO %I;', current_database(), l.rolname)
FROM known k
JOIN pg_roles l ON l.rolname = k.login OR (k.prefix <> '' AND starts_with(l.rolname, k.prefix))
WHERE l.rolcanlogin AND NOT has_database_privilege(l.oid, current_database(), 'CONNECT')
ORDER BY 1;

-- name: class_role_powers
-- A class role may use schema public and nothing more: no CREATE, TEMPORARY only when a
-- client of the class may have temporary tables, no login, no other role.
WITH c(class, role, temp) AS (
  VALUES ('app', :'app_role', :'app_temp'::bool), ('readonly', :'readonly_role', :'readonly_temp'::bool))
SELECT format('%s class role %s may CREATE in schema public', c.class, c.role),
       format('REVOKE CREATE ON SCHEMA public FROM %I;', c.role)
FROM c JOIN pg_roles r ON r.rolname = c.role
WHERE has_schema_privilege(r.oid, 'public', 'CREATE')
UNION ALL
SELECT format('%s class role %s may CREATE in the database', c.class, c.role),
       format('REVOKE CREATE ON DATABASE %I FROM %I;', current_database(), c.role)
FROM c JOIN pg_roles r ON r.rolname = c.role
WHERE has_database_privilege(r.oid, current_database(), 'CREATE')
UNION ALL
SELECT format('%s class role %s may create temporary tables, and no %s client is allowed them',
              c.class, c.role, c.class),
       format('REVOKE TEMPORARY ON DATABASE %I FROM %I;', current_database(), c.role)
FROM c JOIN pg_roles r ON r.rolname = c.role
WHERE NOT c.temp AND has_database_privilege(r.oid, current_database(), 'TEMPORARY')
UNION ALL
SELECT format('%s class role %s may not create temporary tables, and a %s client is allowed them',
              c.class, c.role, c.class),
       format('GRANT TEMPORARY ON DATABASE %I TO %I;', current_database(), c.role)
FROM c JOIN pg_roles r ON r.rolname = c.role
WHERE c.temp AND NOT has_database_privilege(r.oid, current_database(), 'TEMPORARY')
UNION ALL
SELECT format('%s class role %s has no USAGE on schema public', c.class, c.role),
       format('GRANT USAGE ON SCHEMA public TO %I;', c.role)
FROM c JOIN pg_roles r ON r.rolname = c.role
WHERE NOT has_schema_privilege(r.oid, 'public', 'USAGE')
UNION ALL
SELECT format('%s class role %s is a member of %s', c.class, c.role, o.rolname),
       format('REVOKE %I FROM %I;', o.rolname, c.role)
FROM c JOIN pg_roles r ON r.rolname = c.role
JOIN pg_auth_members m ON m.member = r.oid
JOIN pg_roles o ON o.oid = m.roleid
UNION ALL
SELECT format('%s class role %s can log in or holds role attributes', c.class, c.role),
       format('ALTER ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;', c.role)
FROM c JOIN pg_roles r ON r.rolname = c.role
WHERE r.rolcanlogin OR r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls
ORDER BY 1;

-- name: class_table_privileges
-- What a class role holds on each table and sequence of schema public, against its class:
-- app SELECT, INSERT, UPDATE, DELETE on tables, USAGE, SELECT, UPDATE on sequences;
-- readonly SELECT on both. More is revoked, less is granted, GRANT OPTION never.
WITH c(class, role, tables, sequences) AS (
  VALUES ('app', :'app_role', ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'], ARRAY['USAGE', 'SELECT', 'UPDATE']),
         ('readonly', :'readonly_role', ARRAY['SELECT'], ARRAY['SELECT'])),
objects AS (
  SELECT c.class, c.role, r.oid AS role_oid, cl.oid AS rel, cl.relkind = 'S' AS is_sequence,
         CASE WHEN cl.relkind = 'S' THEN c.sequences ELSE c.tables END AS allowed,
         CASE WHEN cl.relkind = 'S' THEN ARRAY['USAGE', 'SELECT', 'UPDATE']
              ELSE ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER'] END AS every
  FROM c JOIN pg_roles r ON r.rolname = c.role
  CROSS JOIN pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace
  WHERE n.nspname = 'public' AND cl.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')),
held AS (
  SELECT o.*, p.priv,
         CASE WHEN o.is_sequence THEN has_sequence_privilege(o.role_oid, o.rel, p.priv)
              ELSE has_table_privilege(o.role_oid, o.rel, p.priv) END AS has
  FROM objects o CROSS JOIN LATERAL unnest(o.every) p(priv))
SELECT format('%s class role %s may %s on %s', class, role, string_agg(priv, ', ' ORDER BY array_position(every, priv)), rel::regclass),
       format('REVOKE %s ON %s%s FROM %I;', string_agg(priv, ', ' ORDER BY array_position(every, priv)),
              CASE WHEN is_sequence THEN 'SEQUENCE ' ELSE 'TABLE ' END, rel::regclass, role)
FROM held WHERE has AND NOT priv = ANY (allowed)
GROUP BY class, role, rel, is_sequence
UNION ALL
SELECT format('%s class role %s lacks %s on %s', class, role, string_agg(priv, ', ' ORDER BY array_position(every, priv)), rel::regclass),
       format('GRANT %s ON %s%s TO %I;', string_agg(priv, ', ' ORDER BY array_position(every, priv)),
              CASE WHEN is_sequence THEN 'SEQUENCE ' ELSE 'TABLE ' END, rel::regclass, role)
FROM held WHERE NOT has AND priv = ANY (allowed)
GROUP BY class, role, rel, is_sequence
UNION ALL
SELECT DISTINCT format('%s class role %s holds GRANT OPTION on %s', o.class, o.role, o.rel::regclass),
       format('REVOKE GRANT OPTION FOR ALL ON %s%s FROM %I;',
              CASE WHEN o.is_sequence THEN 'SEQUENCE ' ELSE 'TABLE ' END, o.rel::regclass, o.role)
FROM objects o JOIN pg_class cl ON cl.oid = o.rel
CROSS JOIN LATERAL aclexplode(cl.relacl) a
WHERE a.grantee = o.role_oid AND a.is_grantable
ORDER BY 1;

-- name: class_default_privileges
-- Tables and sequences a later migration creates reach the class roles only through the
-- owner's default privileges in schema public.
WITH c(class, role, tables, sequences) AS (
  VALUES ('app', :'app_role', ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'], ARRAY['USAGE', 'SELECT', 'UPDATE']),
         ('readonly', :'readonly_role', ARRAY['SELECT'], ARRAY['SELECT'])),
kinds(objtype, word) AS (VALUES ('r', 'TABLES'), ('S', 'SEQUENCES'))
SELECT format('%s created later will not be granted to the %s class role %s (the owner''s default privileges lack %s)',
              lower(k.word), c.class, c.role,
              array_to_string(CASE k.objtype WHEN 'r' THEN c.tables ELSE c.sequences END, ', ')),
       format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public GRANT %s ON %s TO %I;',
              :'owner', array_to_string(CASE k.objtype WHEN 'r' THEN c.tables ELSE c.sequences END, ', '),
              k.word, c.role)
FROM c JOIN pg_roles r ON r.rolname = c.role
CROSS JOIN kinds k
JOIN pg_roles o ON o.rolname = :'owner'
WHERE NOT (CASE k.objtype WHEN 'r' THEN c.tables ELSE c.sequences END) <@ ARRAY(
  SELECT a.privilege_type::text
  FROM pg_default_acl d CROSS JOIN LATERAL aclexplode(d.defaclacl) a
  WHERE d.defaclrole = o.oid AND d.defaclnamespace = 'public'::regnamespace
    AND d.defaclobjtype::text = k.objtype AND a.grantee = r.oid)
ORDER BY 1;

-- name: class_stale_logins
-- Logins with a class's rotation prefix (managed mode) that have no session: left behind by
-- an interrupted rotation or a replaced instance (compare with GET /status first).
WITH known(class, prefix) AS (
  VALUES ('app', :'app_prefix'), ('readonly', :'readonly_prefix'), ('migrator', :'migrator_prefix'))
SELECT format('stale %s login role %s (rotation prefix, no sessions)', k.class, r.rolname),
       format('REVOKE CONNECT ON DATABASE %I FROM %I; DROP ROLE %I;', current_database(), r.rolname, r.rolname)
FROM known k JOIN pg_roles r ON k.prefix <> '' AND starts_with(r.rolname, k.prefix)
WHERE NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.usename = r.rolname)
ORDER BY 1;
