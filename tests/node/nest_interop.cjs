// Real @nestjs/microservices processes for tests/nestjs.rs. Plain JS: decorators are
// applied by hand. Packages resolve from NEST_DIR (a folder with node_modules, e.g.
// tests/node/nest11 for the current major), else from tests/node (Nest 10).
//   node nest_interop.cjs server <nats-url>   a Nest microservice; prints "ready <nest version>"
//   node nest_interop.cjs client <nats-url>   a ClientProxy's send/emit; prints JSON results
const path = require('path');
const req = require('module').createRequire(path.join(process.env.NEST_DIR || __dirname, 'package.json'));
req('reflect-metadata');
const { Controller, Module } = req('@nestjs/common');
const { NestFactory } = req('@nestjs/core');
const { ClientProxyFactory, EventPattern, MessagePattern, RpcException, Transport } = req('@nestjs/microservices');
const { connect, StringCodec } = req('nats');
const { Observable, firstValueFrom, from, lastValueFrom, toArray } = req('rxjs');
const NEST_VERSION = req('@nestjs/microservices/package.json').version;

const [mode, url] = process.argv.slice(2);

function decorate(cls, method, decorator) {
  decorator(cls.prototype, method, Object.getOwnPropertyDescriptor(cls.prototype, method));
}

async function server() {
  const nc = await connect({ servers: url });
  class Handlers {
    sum(data) { return data.reduce((a, b) => a + b, 0); }
    count() { return from([1, 2, 3]); }
    fail() { throw new RpcException({ statusCode: 409, message: 'taken' }); }
    boom() { throw new RpcException('plain'); }
    // data.values, then an RpcException a tick later (Nest folds an error raised in the
    // same tick as the values into the last value's isDisposed and loses it).
    flaky(data) {
      return new Observable((s) => {
        data.values.forEach((v) => s.next(v));
        setTimeout(() => s.error(new RpcException({ statusCode: 409, message: 'late' })), 20);
      });
    }
    // Two values, then nothing: never completes.
    hang() { return new Observable((s) => { s.next(1); s.next(2); }); }
    event(data) { nc.publish('nest.seen', StringCodec().encode(JSON.stringify(data))); }
  }
  decorate(Handlers, 'sum', MessagePattern({ cmd: 'sum' }));
  decorate(Handlers, 'count', MessagePattern('nest.count'));
  decorate(Handlers, 'fail', MessagePattern('nest.fail'));
  decorate(Handlers, 'boom', MessagePattern('nest.boom'));
  decorate(Handlers, 'flaky', MessagePattern('nest.flaky'));
  decorate(Handlers, 'hang', MessagePattern('nest.hang'));
  decorate(Handlers, 'event', EventPattern('nest.event'));
  Controller()(Handlers);
  class AppModule {}
  Module({ controllers: [Handlers] })(AppModule);
  const app = await NestFactory.createMicroservice(AppModule, { transport: Transport.NATS, options: { servers: [url] }, logger: false });
  await app.listen();
  console.log(`ready ${NEST_VERSION}`);
}

async function client() {
  const c = ClientProxyFactory.create({ transport: Transport.NATS, options: { servers: [url] } });
  await c.connect();
  const out = { nest: NEST_VERSION };
  out.greet = await firstValueFrom(c.send('svc.greet', { name: 'nest' }));
  try {
    await firstValueFrom(c.send({ cmd: 'lookup' }, { id: 7 }));
    out.lookup = 'no error';
  } catch (e) {
    out.lookup = e;
  }
  out.list = await lastValueFrom(c.send('svc.list', {}).pipe(toArray()));
  await lastValueFrom(c.emit('svc.created', { id: 1 }));
  await c.close();
  console.log(JSON.stringify(out));
}

(mode === 'server' ? server() : client()).catch((e) => {
  console.error(e);
  process.exit(1);
});
