"""XEP-0013 through slixmpp's xep_0013 plugin (Debian's python3-slixmpp), for spec/flexible_spec.lua.

Usage: /usr/bin/python3 xep0013_client.py JID PORT PASSWORD
Logs in on 127.0.0.1:PORT (plaintext), asks for the count and the headers, views the second
message, sends initial presence (no flood may follow), purges, asks for the count again, and
prints one JSON object with what it saw.
"""

import asyncio
import json
import sys

import slixmpp

NS = 'http://jabber.org/protocol/offline'


class Client(slixmpp.ClientXMPP):
    def __init__(self, jid, password):
        super().__init__(jid, password)
        self.register_plugin('xep_0030')
        self.register_plugin('xep_0013')
        self['feature_mechanisms'].unencrypted_plain = True
        self.result = {}
        self.plain_messages = 0
        self.add_event_handler('session_start', self.start)
        self.add_event_handler('message', self.on_message)
        self.add_event_handler('disconnected', lambda _: self.done.set_result(True)
                               if not self.done.done() else None)
        self.done = asyncio.get_event_loop().create_future()

    def on_message(self, msg):
        if msg.xml.find('{%s}offline' % NS) is None:
            self.plain_messages += 1

    async def count(self):
        info = await self['xep_0013'].get_count()
        for field in info.xml.iter('{jabber:x:data}field'):
            if field.get('var') == 'number_of_messages':
                return int(field.find('{jabber:x:data}value').text)
        raise ValueError('no number_of_messages in ' + str(info))

    async def start(self, _event):
        try:
            self.result['count'] = await self.count()
            items = sorted((await self['xep_0013'].get_headers())['disco_items']['items'], key=lambda i: i[1])
            self.result['headers'] = len(items)
            self.result['names'] = [name for (_jid, _node, name) in items]
            node = items[1][1]
            viewed = asyncio.get_event_loop().create_future()
            self['xep_0013'].view(node, callback=viewed.set_result)
            iq = await asyncio.wait_for(viewed, 10)
            results = iq['offline']['results']
            self.result['viewed'] = [m['body'] for m in results]
            self.result['viewed_node_ok'] = self.viewed_nodes_ok(results, node)
            self.send_presence()
            await asyncio.sleep(1)
            self.result['flooded'] = self.plain_messages
            purged = asyncio.get_event_loop().create_future()
            self['xep_0013'].purge(callback=purged.set_result)
            iq = await asyncio.wait_for(purged, 10)
            self.result['purge'] = iq['type']
            self.result['after_purge'] = await self.count()
        except Exception as e:  # reported in the JSON, and the exit status
            self.result['error'] = repr(e)
        self.disconnect()

    @staticmethod
    def viewed_nodes_ok(results, node):
        for m in results:
            off = m.xml.find('{%s}offline' % NS)
            item = off.find('{%s}item' % NS) if off is not None else None
            if item is None or item.get('node') != node:
                return False
        return bool(results)


def main():
    jid, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    client = Client(jid, password)
    client.connect(address=('127.0.0.1', port), disable_starttls=True, force_starttls=False)
    loop = asyncio.get_event_loop()
    loop.run_until_complete(asyncio.wait_for(client.done, 30))
    print('RESULT ' + json.dumps(client.result, sort_keys=True), flush=True)
    sys.exit(1 if 'error' in client.result else 0)


if __name__ == '__main__':
    main()
