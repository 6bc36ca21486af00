// node-postgres in transaction mode: CONNECTIONS clients at once, each with its own
// application_name and named prepared statements (one Parse per client, many Binds on
// whichever backend session the transaction lands). Prints "ok".
// Usage: node pooled_node.js CONNECTION_STRING CONNECTIONS
const { Client } = require('pg');

const [connectionString, count] = process.argv.slice(2);

function check(got, want, what) {
  if (got !== want) {
    throw new Error(`${what}: got ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
  }
}

async function one(i) {
  const client = new Client({ connectionString });
  await client.connect();
  await client.query(`SET application_name = 'node${i}'`);
  for (let round = 0; round < 10; round++) {
    const r = await client.query({
      name: 'mine',
      text: "SELECT $1::int * 3 AS n, current_setting('application_name') AS app",
      values: [round],
    });
    check(r.rows[0].n, round * 3, `client ${i} round ${round}`);
    check(r.rows[0].app, `node${i}`, `client ${i} application_name`);
  }
  await client.end();
}

Promise.all([...Array(Number(count)).keys()].map(one))
  .then(() => console.log('ok'))
  .catch((e) => { console.error(e); process.exit(1); });
