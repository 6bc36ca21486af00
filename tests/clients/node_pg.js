// node-postgres through rolegate: its Pool (concurrent clients), named prepared statements
// (one Parse, many Binds), a transaction, DISCARD ALL as a pool's reset would send it, and
// a DDL statement, refused for app and readonly clients.
// Usage: node node_pg.js CONNECTION_STRING OWNER_ROLE CLASS   (prints "ok")
const { Pool } = require('pg');

const [connectionString, owner, cls] = process.argv.slice(2);

function check(got, want, what) {
  if (got !== want) {
    throw new Error(`${what}: got ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
  }
}

async function main() {
  const pool = new Pool({ connectionString, max: 4 });
  const sums = await Promise.all(
    [1, 2, 3, 4, 5, 6, 7, 8].map((n) =>
      pool.query({ name: 'plus_one', text: 'SELECT $1::int + 1 AS n', values: [n] })));
  check(sums.map((r) => r.rows[0].n).join(','), '2,3,4,5,6,7,8,9', 'named statements');

  const client = await pool.connect();
  const who = async () => (await client.query('SELECT current_user::text AS u')).rows[0].u;
  check(await who(), owner, 'current_user');
  await client.query('BEGIN');
  check((await client.query('SELECT $1::text AS t', ['in a transaction'])).rows[0].t,
    'in a transaction', 'extended query in a transaction');
  await client.query('COMMIT');
  await client.query('DISCARD ALL');
  check(await who(), owner, 'current_user after DISCARD ALL');

  try {
    await client.query('CREATE TABLE node_pg_probe (id int)');
    check(cls, 'migrator', 'CREATE TABLE went through');
    await client.query('DROP TABLE node_pg_probe');
  } catch (e) {
    if (cls === 'migrator') throw e;
    check(e.code, '42501', 'SQLSTATE of the refused DDL');
    check(e.message.startsWith('rolegate:'), true, `refusal message ${e.message}`);
  }
  check(await who(), owner, 'current_user after the refusal');
  client.release();
  await pool.end();
  console.log('ok');
}

main().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
