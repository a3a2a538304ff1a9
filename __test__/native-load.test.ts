import test from 'ava';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const ROOT = path.resolve(__dirname, '..');

/** Runs `code` in a fresh Node (tsx) process from the repo root; returns stdout. */
function node(code: string, env: Record<string, string> = {}): string {
  const r = spawnSync(process.execPath, ['--import=tsx', '-e', code], {
    cwd: ROOT,
    encoding: 'utf8',
    env: { ...process.env, ...env },
  });
  if (r.status !== 0) throw new Error(r.stderr);
  return r.stdout;
}

const PRINT = `
const { loadBinding } = require('./ts/native.ts');
try { loadBinding(process.env.DIR || undefined); console.log('LOADED'); }
catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })); }`;

test('a missing addon: NATIVE_LOAD names the triple, each path tried and the loader messages', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snella-noaddon-'));
  fs.copyFileSync(path.join(ROOT, 'native/binding.js'), path.join(dir, 'binding.js'));
  const e = JSON.parse(node(PRINT, { DIR: dir }));
  t.is(e.code, 'NATIVE_LOAD');
  t.regex(e.message, /for linux-x64-gnu/);
  t.true(e.message.includes(path.join(dir, 'snella.linux-x64-gnu.node') + ' (missing)'));
  t.regex(e.message, /package @snella\/snella-linux-x64-gnu \(not installed\)/);
  t.regex(e.message, /Cannot find module '\.\/snella\.linux-x64-gnu\.node'/);
});

test('an addon that dlopen rejects: the dlopen message is in the error', (t) => {
  const bogus = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'snella-bogus-')), 'snella.linux-x64-gnu.node');
  fs.writeFileSync(bogus, 'not an ELF file, padded to more than a header '.repeat(4));
  const e = JSON.parse(node(PRINT, { NAPI_RS_NATIVE_LIBRARY_PATH: bogus }));
  t.is(e.code, 'NATIVE_LOAD');
  t.true(e.message.includes(`$NAPI_RS_NATIVE_LIBRARY_PATH ${bogus} (exists`));
  t.regex(e.message, /invalid ELF header|file too short/);
});

test('the real addon loads', (t) => {
  t.is(node(PRINT).trim(), 'LOADED');
});
