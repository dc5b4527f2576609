#ifndef GMIGRATE_CNETLINK_SHIM_H
#define GMIGRATE_CNETLINK_SHIM_H
#include <netlink/netlink.h>
#include <netlink/socket.h>
#include <netlink/msg.h>
#include <netlink/cache.h>
#include <netlink/route/link.h>
#include <linux/netlink.h>
#include <net/if.h>
#endif
