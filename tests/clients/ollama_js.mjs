// The `ollama` npm package against a running `turbine serve` (OLLAMA_HOST): a streamed chat
// and a list. Exits non-zero on any failure. `ollama` is resolved from TURBINE_NPM_PREFIX (a
// folder where `npm install --prefix DIR ollama` ran), else from the usual node_modules.
// tests/clients/test_python_clients.py runs it against the server it starts.
import { createRequire } from 'node:module';
import { join } from 'node:path';

const prefix = process.env.TURBINE_NPM_PREFIX;
const require = createRequire(prefix ? join(prefix, 'package.json') : import.meta.url);
const { Ollama } = require('ollama');

const MODEL = 'gemma3:270m';
let host = process.env.OLLAMA_HOST || '127.0.0.1:11434';
if (!host.includes('://')) host = 'http://' + host;

function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
}

async function main() {
  const client = new Ollama({ host });

  const list = await client.list();
  const m = list.models.find((x) => x.model === MODEL);
  check(m, `${MODEL} in list: ${JSON.stringify(list)}`);
  check(m.size > 200_000_000 && m.digest.length === 64, 'size and digest');
  check(m.details.family === 'gemma3', 'details.family');

  const stream = await client.chat({
    model: MODEL,
    messages: [{ role: 'user', content: 'Why is the sky blue?' }],
    options: { temperature: 0, num_predict: 8 },
    stream: true,
  });
  let text = '';
  let parts = 0;
  let last;
  for await (const part of stream) {
    parts++;
    text += part.message.content;
    last = part;
  }
  check(parts > 1, `several chunks (got ${parts})`);
  check(last.done && last.done_reason === 'length' && last.eval_count === 8, `final chunk: ${JSON.stringify(last)}`);
  check(text.trim().length > 0, 'non-empty answer');

  let status = 0;
  try {
    await client.chat({ model: 'no-such-model:latest', messages: [{ role: 'user', content: 'hi' }], stream: false });
  } catch (e) {
    status = e.status_code;
  }
  check(status === 404, `missing model answers 404 (got ${status})`);

  console.log(`ollama-js: list ok, streamed chat ok (${parts} chunks): ${JSON.stringify(text)}`);
}

main().catch((e) => {
  console.error('ollama-js: FAILED:', e && e.stack ? e.stack : e);
  process.exit(1);
});
