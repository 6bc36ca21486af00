-- rolegate setup: the statements `rolegate setup` runs, section by section.
--
-- Placeholders: :"name" is an identifier (quoted with quote_ident), :'name' a string
-- literal. Which sections run depends on what already exists, so running setup twice
-- changes nothing; `rolegate setup --print-sql` shows the exact plan for a cluster.
--
-- The layout (see shared/background): a NOLOGIN owner role owns the database, the schema
-- and every object in it; short-lived login roles are granted the owner role and every
-- session runs SET ROLE <owner>; a rotator role may create and drop login roles but is
-- never a superuser and never acts as the owner itself.

-- name: create_owner
-- Owns every object. Nobody has its password: it cannot log in.
CREATE ROLE :"owner" NOLOGIN;

-- name: owner_nologin
ALTER ROLE :"owner" NOLOGIN;

-- name: create_database
CREATE DATABASE :"database" OWNER :"owner";

-- name: reown_database
ALTER DATABASE :"database" OWNER TO :"owner";

-- name: database_privileges
-- Only the owner role (and so its login roles) may connect.
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"database" TO :"owner";

-- name: create_rotator
-- Creates and drops login roles during rotation. NOINHERIT: it can hand out the owner
-- role without acting as the owner.
CREATE ROLE :"rotator" LOGIN CREATEROLE NOINHERIT PASSWORD :'rotator_password';

-- name: rotator_attributes
ALTER ROLE :"rotator" LOGIN CREATEROLE NOINHERIT;

-- name: grant_rotator_admin
-- PostgreSQL 15 and older: ADMIN OPTION lets the rotator grant the owner role.
GRANT :"owner" TO :"rotator" WITH ADMIN OPTION;
GRANT pg_signal_backend TO :"rotator";

-- name: grant_rotator_admin_pg16
-- PostgreSQL 16 and newer: ADMIN OPTION only, without the right to use the role itself.
GRANT :"owner" TO :"rotator" WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;
GRANT pg_signal_backend TO :"rotator";

-- name: create_login
-- The first login role. Its password is sent as a SCRAM verifier, never in plaintext.
CREATE ROLE :"login" LOGIN PASSWORD :'login_password';

-- name: set_login_password
ALTER ROLE :"login" LOGIN PASSWORD :'login_password';

-- name: login_membership
-- A second line of defence: even a session that skipped rolegate starts as the owner.
GRANT :"owner" TO :"login";
ALTER ROLE :"login" SET role = :'owner';

-- name: schema_layout
-- Run inside the database: the owner owns schema public; nobody else may create in it.
ALTER SCHEMA public OWNER TO :"owner";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner";

-- name: create_app_role
-- Optional: a DML-only role app clients run as, so PostgreSQL enforces the app class too.
CREATE ROLE :"app_role" NOLOGIN;

-- name: app_role_privileges
-- Run inside the database.
GRANT CONNECT ON DATABASE :"database" TO :"app_role";
GRANT USAGE ON SCHEMA public TO :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app_role";
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO :"app_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO :"app_role";

-- name: app_role_login
-- The configured login role may take the app role (the rotator grants it to its own).
GRANT :"app_role" TO :"login";

-- ---------------------------------------------------------------------------------------
-- A login per class ([backend.logins]): PostgreSQL enforces every class as well. Each class
-- runs as a NOLOGIN class role (the owner for migrators), reached through a NOINHERIT login
-- that is a member of nothing else: a session whose role is reset holds no privilege.

-- name: create_class_role
CREATE ROLE :"class_role" NOLOGIN;

-- name: class_role_attributes
ALTER ROLE :"class_role" NOLOGIN NOINHERIT;

-- name: grant_rotator_admin_class
-- PostgreSQL 15 and older: the rotator grants the class role to the logins it makes.
GRANT :"class_role" TO :"rotator" WITH ADMIN OPTION;

-- name: grant_rotator_admin_class_pg16
GRANT :"class_role" TO :"rotator" WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;

-- name: create_connect_grantor
-- Holds CONNECT on the database with GRANT OPTION, so that the rotator (acting as it) can
-- give each new login its own CONNECT without being able to connect itself.
CREATE ROLE :"grantor" NOLOGIN;

-- name: connect_grantor
GRANT CONNECT ON DATABASE :"database" TO :"grantor" WITH GRANT OPTION;
GRANT :"grantor" TO :"rotator";

-- name: create_class_login
-- A class's login role. Its password is sent as a SCRAM verifier, never in plaintext.
CREATE ROLE :"login" LOGIN NOINHERIT PASSWORD :'login_password';

-- name: set_class_login_password
ALTER ROLE :"login" LOGIN PASSWORD :'login_password';

-- name: class_login_membership
-- NOINHERIT: the login holds nothing of its class role until the session takes it (every
-- session starts in it: ALTER ROLE … SET role, and rolegate's SET ROLE). CONNECT is the
-- login's own, as it inherits nothing.
ALTER ROLE :"login" NOINHERIT;
GRANT :"class_role" TO :"login";
ALTER ROLE :"login" SET role = :'class_role';
GRANT CONNECT ON DATABASE :"database" TO :"login";

-- name: class_login_membership_pg16
-- PostgreSQL 16 and newer record INHERIT per membership: the login's is made FALSE too.
ALTER ROLE :"login" NOINHERIT;
GRANT :"class_role" TO :"login" WITH INHERIT FALSE;
ALTER ROLE :"login" SET role = :'class_role';
GRANT CONNECT ON DATABASE :"database" TO :"login";

-- name: revoke_membership
-- A login is a member of exactly its class role.
REVOKE :"other_role" FROM :"login";

-- name: app_class_privileges
-- Run inside the database. Rows only: SELECT, INSERT, UPDATE, DELETE on tables, what
-- nextval/setval need on sequences; no CREATE, no GRANT OPTION (REVOKE ALL first, in the
-- same transaction, brings an older layout in line). Default privileges cover every table
-- a later migration creates.
REVOKE ALL ON SCHEMA public FROM :"class_role";
GRANT USAGE ON SCHEMA public TO :"class_role";
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"class_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"class_role";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM :"class_role";
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO :"class_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  REVOKE ALL ON TABLES FROM :"class_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"class_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  REVOKE ALL ON SEQUENCES FROM :"class_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO :"class_role";
REVOKE ALL ON DATABASE :"database" FROM :"class_role";

-- name: readonly_class_privileges
-- Run inside the database. Reads only: SELECT on tables and sequences.
REVOKE ALL ON SCHEMA public FROM :"class_role";
GRANT USAGE ON SCHEMA public TO :"class_role";
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"class_role";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"class_role";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM :"class_role";
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO :"class_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  REVOKE ALL ON TABLES FROM :"class_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT ON TABLES TO :"class_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  REVOKE ALL ON SEQUENCES FROM :"class_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT ON SEQUENCES TO :"class_role";
REVOKE ALL ON DATABASE :"database" FROM :"class_role";

-- name: class_temporary
-- Only for a class some of whose clients have allow = ["temp_tables"].
GRANT TEMPORARY ON DATABASE :"database" TO :"class_role";
